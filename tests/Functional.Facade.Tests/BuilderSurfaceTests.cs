namespace Functional.Facade.Tests;

/// <summary>The fluent builder's contract: Build validates and freezes, reads no file, and makes the core's
/// request once, which the plan keeps.</summary>
public static class BuilderSurfaceTests
{
    private static TrainerBuilder GoldenRun(string name, string output) =>
        Trainer.CreateBuilder()
            .UseModel(Path.Combine(Golden.Case(name), "model"))
            .UseData(Path.Combine(Golden.Case(name), "data.jsonl"))
            .UseOutput(output)
            .TrainForSteps(1);

    [FacadeTest("Build validates: accumulation 0 names AccumulateGradients and the command-line flag")]
    public static void BuildValidates()
    {
        var e = Check.Throws<InvalidInputException>(
            () => Trainer.CreateBuilder().UseModel("model").UseData("data.jsonl").UseOutput("out").AccumulateGradients(0).Build(),
            "Build with accumulation 0");
        Check.Equal("AccumulateGradients", e.Origin, "origin");
        Check.True(e.Problem.Contains("--gradient-accumulation-steps"), $"the problem names the flag ({e.Problem})");
    }

    [FacadeTest("Build freezes: builder calls after Build leave the plan as it was")]
    public static void BuildFreezes()
    {
        var builder = Trainer.CreateBuilder().UseModel("model").UseData("data.jsonl").UseOutput("out").UseAdamW(1e-3);
        var plan = builder.Build();
        builder.UseAdamW(5e-1).AccumulateGradients(7);
        Check.Equal(1e-3, plan.LearningRate, "the plan's learning rate");
        Check.Equal(1, plan.GradientAccumulationSteps, "the plan's accumulation");
        Check.Equal(1e-3, plan.Request.Options.LearningRate, "the request's learning rate");
        Check.Throws<InvalidOperationException>(() => builder.Build(), "a second Build");
    }

    [FacadeTest("the plan keeps the one request Build made; a copy of its options changed later leaves it alone")]
    public static void PlanKeepsOneRequest()
    {
        var plan = Trainer.CreateBuilder().UseModel("model").UseData("data.jsonl").UseOutput("out")
            .UseAdamW(2e-4).AccumulateGradients(4).Build();
        var request = plan.Request;
        Check.True(ReferenceEquals(request, plan.Request), "the same request on every read");
        var options = plan.ToFineTuneOptions();
        options.LearningRate = 9;
        options.GradientAccumulationSteps = 9;
        Check.True(ReferenceEquals(request, plan.Request), "still the same request");
        Check.Equal(2e-4, plan.Request.Options.LearningRate, "learning rate");
        Check.Equal(4, plan.Request.Options.GradientAccumulationSteps, "accumulation");
        Check.Equal("model", plan.Request.ModelPath, "model path");
    }

    [FacadeTest("Build reads no file: a missing LoRA adapter folder builds, and Fit refuses it with the core's message")]
    public static void MissingLoraAdapterFailsAtFit()
    {
        using var folder = new TempFolder();
        var missing = folder.File("no-adapter");
        var plan = GoldenRun("gpt2-lora", folder.File("out")).UseLoraAdapter(missing).Build();
        var expected = Check.Throws<InvalidInputException>(() => Peft.Lora.loadConfig(missing), "the core reading the folder");
        var e = Check.Throws<InvalidInputException>(() => plan.Fit(), "Fit");
        Check.Equal(expected.Message, e.Message, "the message");
        Check.True(!Directory.Exists(folder.File("out")) || !Directory.EnumerateFileSystemEntries(folder.File("out")).Any(), "nothing is written");
    }

    [FacadeTest("Build reads no file: a missing prefix adapter folder builds, and Fit refuses it with the core's message")]
    public static void MissingPrefixAdapterFailsAtFit()
    {
        using var folder = new TempFolder();
        var missing = folder.File("no-prefix");
        var plan = GoldenRun("gpt2-prefix", folder.File("out")).UsePrefixAdapter(missing).Build();
        Check.Equal(0, plan.Request.Prefix.Value.NumPrefixTokens, "the run reads the adapter's size");
        var expected = Check.Throws<InvalidInputException>(() => Peft.PrefixTuning.loadConfig(missing), "the core reading the folder");
        var e = Check.Throws<InvalidInputException>(() => plan.Fit(), "Fit");
        Check.Equal(expected.Message, e.Message, "the message");
    }

    [FacadeTest("a prefix adapter brings its own number of prefix tokens to the run (Fit trains on it)")]
    public static void PrefixAdapterTrainsWithItsOwnSize()
    {
        using var folder = new TempFolder();
        var adapter = Path.Combine(Golden.Case("gpt2-prefix"), "adapter");
        var result = GoldenRun("gpt2-prefix", folder.File("out")).UsePrefixAdapter(adapter).UseLogging(1).Build().Fit();
        Check.Equal(1, result.Steps, "one step");
        Check.True(double.IsFinite(result.FinalLoss), "a finite loss");
    }
}
