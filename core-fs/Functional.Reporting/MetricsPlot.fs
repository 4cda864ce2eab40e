namespace Functional.Reporting

open System
open System.Globalization
open System.IO
open ScottPlot
open SkiaSharp

/// A PNG chart of a training run: loss against optimizer step (training loss as a line, evaluation
/// loss as markers) on the left axis and the learning rate on a right axis. Drawn with ScottPlot 5
/// (SkiaSharp), so it works headless.
[<RequireQualifiedAccess>]
module MetricsPlot =

    /// Width of the image in pixels.
    [<Literal>]
    let Width = 1000

    /// Height of the image in pixels.
    [<Literal>]
    let Height = 600

    let private trainColor = Color.FromHex "#1f77b4"
    let private evalColor = Color.FromHex "#d62728"
    let private lrColor = Color.FromHex "#2ca02c"

    /// Sans-serif families tried first; ScottPlot's own guess (Fonts.Sans) can land on a serif font.
    let private preferredFonts = [ "DejaVu Sans"; "Liberation Sans"; "Arial"; "Helvetica"; "Segoe UI"; "Noto Sans" ]

    /// An installed sans-serif font family, or ScottPlot's default when none is recognised.
    let private sansFont =
        lazy
            (let installed = SKFontManager.Default.FontFamilies |> Set.ofSeq
             let isPlainSans (name: string) =
                 name.Contains("Sans", StringComparison.OrdinalIgnoreCase)
                 && not (name.Contains("Mono", StringComparison.OrdinalIgnoreCase))
             preferredFonts
             |> List.tryFind installed.Contains
             |> Option.orElse (installed |> Seq.tryFind isPlainSans)
             |> Option.defaultValue Fonts.Default)

    /// Learning-rate tick labels in one scientific format ("3.0e-04"), zero as "0".
    let private learningRateLabel (value: float) =
        if abs value < 1e-12 then "0" else value.ToString("0.0e-00", CultureInfo.InvariantCulture)

    /// The points whose y is finite (NaN or infinite losses would break the axis limits).
    let private finite (points: (float * float) list) =
        let kept = points |> List.filter (fun (_, y) -> Double.IsFinite y)
        List.map fst kept |> Array.ofList, List.map snd kept |> Array.ofList

    /// Writes the chart to path (a PNG of Width x Height pixels; the folder is created when missing).
    /// steps holds (optimizer step, training loss, learning rate) per logged step; evalPoints holds
    /// (optimizer step, evaluation loss). Non-finite values are left out; with nothing to draw the chart
    /// says "no logged steps".
    let save (path: string) (steps: (int * float * float) list) (evalPoints: (int * float) list) : unit =
        let folder = Path.GetDirectoryName(Path.GetFullPath path)
        Directory.CreateDirectory folder |> ignore
        use plot = new Plot()
        plot.Font.Set sansFont.Value |> ignore
        plot.Title "Loss and learning rate"
        plot.XLabel "optimizer step"
        plot.YLabel "loss"
        plot.Axes.Right.Label.Text <- "learning rate"
        plot.Axes.Right.Label.ForeColor <- lrColor
        plot.Axes.Right.TickGenerator <- TickGenerators.NumericAutomatic(LabelFormatter = Func<float, string> learningRateLabel)
        let trainX, trainY = finite [ for step, loss, _ in steps -> float step, loss ]
        if trainX.Length > 0 then
            let line = plot.Add.ScatterLine(trainX, trainY, trainColor)
            line.LineWidth <- 1.5f
            // A line through one point is invisible: mark it.
            line.MarkerSize <- if trainX.Length = 1 then 7.0f else 0.0f
            line.LegendText <- "training loss"
        let lrX, lrY = finite [ for step, _, lr in steps -> float step, lr ]
        if lrX.Length > 0 then
            let rate = plot.Add.ScatterLine(lrX, lrY, lrColor)
            rate.LineWidth <- 1.5f
            rate.LinePattern <- LinePattern.Dashed
            rate.MarkerSize <- if lrX.Length = 1 then 7.0f else 0.0f
            rate.LegendText <- "learning rate"
            rate.Axes.YAxis <- plot.Axes.Right
            // The rate axis starts at zero, with headroom at the top for the legend.
            let top = Array.max lrY
            if top > 0.0 then plot.Axes.SetLimitsY(0.0, top * 1.25, plot.Axes.Right)
        let evalX, evalY = finite [ for step, loss in evalPoints -> float step, loss ]
        if evalX.Length > 0 then
            let markers = plot.Add.ScatterPoints(evalX, evalY, evalColor)
            markers.MarkerSize <- 9.0f
            markers.MarkerShape <- MarkerShape.FilledCircle
            markers.LegendText <- "evaluation loss"
        if trainX.Length = 0 && evalX.Length = 0 then
            plot.Add.Annotation("no logged steps", Alignment.MiddleCenter) |> ignore
        plot.ShowLegend(Alignment.UpperRight) |> ignore
        plot.SavePng(path, Width, Height) |> ignore

    /// save as the chart a job draws when it finishes (FineTuneRequest.Plot).
    let drawer : (string -> (int * float * float) list -> (int * float) list -> unit) option = Some save
