module Functional.Tests.SettingsTests

open System
open Expecto
open Functional

/// The core names settings; the faces spell them (SettingText, CommandLineFlags, the builder's names).
[<Tests>]
let tests =
    testList "settings" [
        test "a core error names the setting; the command line spells it as its option" {
            let e = InvalidInputException.ForSetting("learning_rate", "", "must be >= 0, with {max_grad_norm} on")
            Expect.equal e.Origin "learning_rate" "the origin is the setting"
            Expect.equal e.Setting "learning_rate" "the setting is known"
            Expect.equal e.Message "learning_rate: must be >= 0, with max_grad_norm on" "plain names when unrendered"
            let cli = e.Render(Func<string, string> CommandLineFlags.Of)
            Expect.equal cli.Message "--learning-rate: must be >= 0, with --max-grad-norm on" "the command line's options"
            Expect.isNull cli.Setting "a rendered error names an option, not a setting"
        }
        test "file errors keep their origin; braces that are not setting mentions stay" {
            let e = InvalidInputException("/data/x.jsonl", "3", "expected {\"prompt\": ...}, found {} (see {Some Field})")
            Expect.isNull e.Setting "a file is not a setting"
            Expect.equal (e.Render(Func<string, string> CommandLineFlags.Of).Message) e.Message "nothing to render"
        }
        test "the core's validation names settings: TrainOptions.validate" {
            let bad = { Training.TrainOptions.defaults with LearningRate = -1.0 }
            let e = Expect.throwsC (fun () -> Training.TrainOptions.validate bad) id :?> InvalidInputException
            Expect.equal e.Setting "learning_rate" "the setting, in snake_case"
        }
    ]
