/// Evaluation loss and perplexity.
module Functional.Tests.EvaluationTests

open System.IO
open Expecto
open TorchSharp
open Functional
open Functional.Checkpoint
open Functional.Data
open Functional.Training
open Functional.Tests.TestUtil

[<Tests>]
let tests =
    testList "evaluation" [
        test "eval loss is the token-weighted mean over the whole set, whatever the batch size; perplexity is exp(loss)" {
            let dir = goldenDir "gpt2-cosine"
            let model = HfModelFolder.load (Path.Combine(dir, "model")) 1L
            let dataset = loadTokenized (Path.Combine(dir, "data.jsonl"))
            let reference =
                use _ = torch.no_grad ()
                model.Module.eval ()
                let all = Batching.collate 32 0L dataset (Array.init dataset.Rows.Length id)
                use logits = model.Module.forward all.InputIds
                use sum = Loss.causalLmSum logits all.Labels
                float (sum.item<float32> ()) / float all.PredictedTokens
            model.Module.train ()
            for batchSize in [ 1; 3; 13 ] do
                let result = Evaluation.evaluate model dataset batchSize 32 0L
                Expect.floatClose { absolute = 1e-6; relative = 1e-5 } result.Loss reference (sprintf "batch size %d" batchSize)
                Expect.floatClose Accuracy.veryHigh result.Perplexity (exp result.Loss) "perplexity = exp(loss)"
            Expect.isTrue model.Module.training "the model's training mode is restored"
        }
    ]
