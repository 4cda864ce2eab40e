namespace Functional.Facade.Tests;

/// <summary>Marks a public static parameterless method as a test of the facade; the F# test runner
/// (tests/Functional.Tests/FacadeTests.fs) finds them by reflection and names each by <see cref="Name"/>.</summary>
[AttributeUsage(AttributeTargets.Method)]
public sealed class FacadeTestAttribute(string name) : Attribute
{
    /// <summary>The test's name: what it shows to be true.</summary>
    public string Name { get; } = name;
}

/// <summary>Assertions that throw with a message naming what was expected.</summary>
public static class Check
{
    public static void True(bool condition, string what)
    {
        if (!condition)
        {
            throw new Exception($"expected: {what}");
        }
    }

    public static void Equal<T>(T expected, T actual, string what)
    {
        if (!EqualityComparer<T>.Default.Equals(expected, actual))
        {
            throw new Exception($"{what}: expected {expected}, got {actual}");
        }
    }

    /// <summary>Runs the action and returns the exception of type T it throws; fails when it throws none or another.</summary>
    public static T Throws<T>(Action action, string what) where T : Exception
    {
        try
        {
            action();
        }
        catch (T e)
        {
            return e;
        }
        catch (Exception e)
        {
            throw new Exception($"{what}: expected {typeof(T).Name}, got {e.GetType().Name}: {e.Message}");
        }
        throw new Exception($"{what}: expected {typeof(T).Name}, nothing was thrown");
    }
}

/// <summary>A temporary folder, deleted on dispose.</summary>
public sealed class TempFolder : IDisposable
{
    public TempFolder()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "functional-facade-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, true);
        }
        catch (IOException)
        {
            // A file still open on another thread: the temp folder is cleaned by the system.
        }
    }
}

/// <summary>The golden test cases (tests/golden, copied next to the test binary).</summary>
public static class Golden
{
    public static string Case(string name) => System.IO.Path.Combine(AppContext.BaseDirectory, "golden", name);
}
