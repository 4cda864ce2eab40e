/// The C# tests of the facade (tests/Functional.Facade.Tests): every public static [FacadeTest] method of
/// that assembly becomes an Expecto test here, so one command runs the F# and the C# tests.
module Functional.Tests.FacadeTests

open System.Reflection
open Expecto
open Functional.Facade.Tests

/// The [FacadeTest] methods, by declaring class and method name (a stable order).
let private facadeTests () =
    typeof<FacadeTestAttribute>.Assembly.GetExportedTypes()
    |> Array.collect (fun t -> t.GetMethods(BindingFlags.Public ||| BindingFlags.Static))
    |> Array.choose (fun m ->
        match m.GetCustomAttribute<FacadeTestAttribute>() with
        | null -> None
        | attribute -> Some(m, attribute.Name))
    |> Array.sortBy (fun (m, _) -> m.DeclaringType.Name, m.Name)

[<Tests>]
let tests =
    testList "facade (C#)" [
        yield test "the C# test assembly holds facade tests, each a public static method without parameters" {
            let found = facadeTests ()
            Expect.isGreaterThanOrEqual found.Length 9 "the builder and entry-point tests are found"
            for m, _ in found do
                Expect.isEmpty (m.GetParameters()) (sprintf "%s takes no parameters" m.Name)
        }
        for m, name in facadeTests () do
            yield testCase (sprintf "%s: %s" m.DeclaringType.Name name) (fun () ->
                try
                    m.Invoke(null, [||]) |> ignore
                with :? TargetInvocationException as e when not (isNull e.InnerException) ->
                    // The C# assertion's own exception and stack trace, not the reflection wrapper.
                    System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e.InnerException).Throw())
    ]
