// Fine-tunes the small LLaMA checkpoint shipped in tests/golden/llama-cosine on its sample data, through the C#
// builder only:
//   dotnet run --project samples/QuickStart -c Release -- [sample-folder] [output-folder]
// The sample folder holds model/ (config.json + model.safetensors) and data.jsonl; by default it is found in the
// repository above this program.
using Functional;

var sample = args.Length > 0 ? args[0] : FindSample();
var output = args.Length > 1 ? args[1] : Path.Combine(Path.GetTempPath(), "functional-quick-start");

var plan = Trainer.CreateBuilder()
    .UseModel(Path.Combine(sample, "model"))
    .UseData(Path.Combine(sample, "data.jsonl"), data => data.MaxSequenceLength = 32)
    .UseOutput(output, overwrite: true)
    .UseAdamW(3e-3, adamW => adamW.WeightDecay = 0.1)
    .UseCosineSchedule(warmupSteps: 2)
    .UseBatchSize(2)
    .AccumulateGradients(2)
    .TrainForSteps(10)
    .OnProgress(p => Console.WriteLine(
        $"step {p.Step}/{p.TotalSteps}  loss {p.Loss:F4}  lr {p.LearningRate:0.00e+00}  grad_norm {p.GradNorm:F3}  {p.TokensPerSecond:F0} tokens/s"))
    .Build();

var result = plan.Fit();
Console.WriteLine($"final loss {result.FinalLoss:F4} after {result.Steps} steps in {result.Seconds:F1} s");
Console.WriteLine($"model:   {result.FinalModelPath}");
Console.WriteLine($"metrics: {result.MetricsPath}");

// tests/golden/llama-cosine in the first folder above the program (or the working folder) that has it.
static string FindSample()
{
    foreach (var start in new[] { AppContext.BaseDirectory, Environment.CurrentDirectory })
    {
        for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
        {
            var candidate = Path.Combine(dir.FullName, "tests", "golden", "llama-cosine");
            if (Directory.Exists(candidate))
            {
                return candidate;
            }
        }
    }
    throw new DirectoryNotFoundException("tests/golden/llama-cosine not found above the program; pass the sample folder as the first argument");
}
