namespace Functional.Runtime

open System
open System.IO
open System.Runtime.InteropServices
open System.Security.Cryptography
open System.Text

/// Starts TorchSharp's native libraries on systems whose libstdc++ is older than the one
/// libLibTorchSharp.so was linked against (Debian 12, Ubuntu 22.04: GLIBCXX_3.4.30 < 3.4.32).
///
/// libLibTorchSharp.so 0.107 lists GLIBCXX_3.4.32 as a required symbol version, but the only symbol
/// behind it (std::ios_base_library_init) is never called. When the system libstdc++ lacks a required
/// GLIBCXX version, a copy of the library is written outside the NuGet cache with that version
/// requirement marked weak (VER_FLG_WEAK in .gnu.version_r), and the copy is loaded before TorchSharp
/// asks for it; the dynamic loader then binds TorchSharp's imports to the loaded copy by soname.
/// Files in the NuGet cache are never modified. On systems with a recent libstdc++ nothing is done.
/// On Linux it also raises glibc's mmap and trim thresholds so that a training step's large tensors
/// reuse freed heap memory instead of faulting fresh mappings in (see MmapThreshold; opt out with
/// FUNCTIONAL_MALLOC_TUNING=0).
[<RequireQualifiedAccess>]
module TorchRuntime =

    let private torchSharpLibrary = "libLibTorchSharp.so"
    let private verFlagWeak = 0x2us

    /// Directories where the host and NuGet may keep native libraries, most specific first.
    let private nativeSearchDirectories () =
        let fromHost =
            match AppContext.GetData "NATIVE_DLL_SEARCH_DIRECTORIES" with
            | :? string as s -> s.Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries) |> List.ofArray
            | _ -> []
        let torchSharpDir = Path.GetDirectoryName(typeof<TorchSharp.torch>.Assembly.Location)
        let besideAssembly =
            if String.IsNullOrEmpty torchSharpDir then []
            else [ torchSharpDir; Path.Combine(torchSharpDir, "runtimes", "linux-x64", "native") ]
        let fromBase = [ AppContext.BaseDirectory; Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native") ]
        let nugetRoot =
            match Environment.GetEnvironmentVariable "NUGET_PACKAGES" with
            | null | "" -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".nuget", "packages")
            | p -> p
        let torchSharpVersion =
            let v = typeof<TorchSharp.torch>.Assembly.GetName().Version
            sprintf "%d.%d.%d" v.Major v.Minor v.Build
        let fromNuget =
            if Directory.Exists nugetRoot then
                [ yield Path.Combine(nugetRoot, "torchsharp", torchSharpVersion, "runtimes", "linux-x64", "native")
                  for package in Directory.EnumerateDirectories nugetRoot do
                      let name = Path.GetFileName package
                      if name.StartsWith "libtorch-" && name.EndsWith "-linux-x64" then
                          for version in Directory.EnumerateDirectories package do
                              yield Path.Combine(version, "runtimes", "linux-x64", "native") ]
            else []
        fromHost @ besideAssembly @ fromBase @ fromNuget |> List.filter Directory.Exists |> List.distinct

    let private findFile (dirs: string list) (matches: string -> bool) =
        dirs
        |> List.tryPick (fun d ->
            Directory.EnumerateFiles d |> Seq.tryFind (fun f -> matches (Path.GetFileName f)))

    /// The libstdc++ this process has mapped (the .NET host itself links it).
    let private systemLibStdCxx () =
        try
            File.ReadAllLines "/proc/self/maps"
            |> Array.tryPick (fun line ->
                let i = line.IndexOf '/'
                if i >= 0 && line.Contains "libstdc++.so" then Some(line.Substring i) else None)
        with _ -> None

    let private readCString (bytes: byte[]) (offset: int) =
        let mutable e = offset
        while e < bytes.Length && bytes[e] <> 0uy do e <- e + 1
        Encoding.ASCII.GetString(bytes, offset, e - offset)

    /// Every (vna_flags offset, version name) in the ELF64 .gnu.version_r section.
    let private versionNeeds (elf: byte[]) =
        let u16 o = int (BitConverter.ToUInt16(elf, o))
        let u32 o = int (BitConverter.ToUInt32(elf, o))
        let u64 o = int (BitConverter.ToUInt64(elf, o))
        if elf.Length < 64 || elf[0] <> 0x7Fuy || elf[1] <> byte 'E' || elf[4] <> 2uy || elf[5] <> 1uy then
            failwith "not a little-endian ELF64 file"
        let shoff = u64 0x28
        let shentsize = u16 0x3A
        let shnum = u16 0x3C
        let section i = shoff + i * shentsize
        [ for i in 0 .. shnum - 1 do
              let sh = section i
              if uint32 (u32 (sh + 4)) = 0x6ffffffeu then // SHT_GNU_verneed
                  let offset = u64 (sh + 0x18)
                  let count = u32 (sh + 0x2C)
                  let strtab = u64 (section (u32 (sh + 0x28)) + 0x18)
                  let mutable need = offset
                  for _ in 1 .. count do
                      let auxCount = u16 (need + 2)
                      let mutable aux = need + u32 (need + 8)
                      for _ in 1 .. auxCount do
                          yield aux + 4, readCString elf (strtab + u32 (aux + 8))
                          aux <- aux + u32 (aux + 12)
                      need <- need + u32 (need + 12) ]

    let private stagingRoot () =
        let cache =
            match Environment.GetEnvironmentVariable "XDG_CACHE_HOME" with
            | null | "" -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".cache")
            | p -> p
        Path.Combine(cache, "functional", "native")

    /// Writes (once) a copy of the library whose missing GLIBCXX requirements are weak; returns its path.
    let private patchedCopy (original: string) (missing: string list) =
        let bytes = File.ReadAllBytes original
        let hash = Convert.ToHexString(SHA256.HashData bytes).Substring(0, 16).ToLowerInvariant()
        let dir = Path.Combine(stagingRoot (), hash)
        let target = Path.Combine(dir, Path.GetFileName original)
        if not (File.Exists target) then
            for flagsOffset, name in versionNeeds bytes do
                if List.contains name missing then
                    let flags = BitConverter.ToUInt16(bytes, flagsOffset) ||| verFlagWeak
                    BitConverter.GetBytes(flags).CopyTo(bytes, flagsOffset)
            Directory.CreateDirectory dir |> ignore
            let staging = target + "." + string Environment.ProcessId + ".tmp"
            File.WriteAllBytes(staging, bytes)
            File.Move(staging, target, true)
        target

    /// glibc's mallopt: sets an allocator parameter; 1 on success.
    [<DllImport("libc", EntryPoint = "mallopt")>]
    extern int private mallopt(int parameter, int value)

    /// Tensors up to this size (256 MB) come from glibc's heap, where freed blocks are reused, instead of
    /// a fresh mmap each time (M_MMAP_THRESHOLD).
    [<Literal>]
    let MmapThreshold = 268435456

    /// Freed memory at the top of glibc's heap is returned to the system beyond this size (1 GB;
    /// M_TRIM_THRESHOLD).
    [<Literal>]
    let TrimThreshold = 1073741824

    /// The environment variable that, set to 0, leaves glibc's allocator as it is.
    [<Literal>]
    let MallocTuningVariable = "FUNCTIONAL_MALLOC_TUNING"

    /// Keeps tensors of a training step out of fresh mmaps. glibc serves allocations above its mmap
    /// threshold (at most 32 MB with the default dynamic threshold) with a new mapping and unmaps it on
    /// free, so every such tensor faults its pages in again: on this project's VM adding two 33 MB
    /// tensors took 63 ms instead of 0.7 ms, and GPT-2's logits (B x T x 8192 in fp32) and their
    /// gradients are that size. With the thresholds raised, freed blocks are reused step after step;
    /// the resident peak does not change, but freed memory (up to TrimThreshold) stays with the
    /// process. Set FUNCTIONAL_MALLOC_TUNING=0 to keep glibc's defaults; other C libraries are left alone.
    let private tuneAllocator () =
        if Environment.GetEnvironmentVariable MallocTuningVariable <> "0" then
            try
                mallopt (-3, MmapThreshold) |> ignore // M_MMAP_THRESHOLD
                mallopt (-1, TrimThreshold) |> ignore // M_TRIM_THRESHOLD
            with
            | :? DllNotFoundException
            | :? EntryPointNotFoundException -> ()

    /// What starting the native libraries did (for `functional doctor`).
    type StartInfo =
        { /// The GLIBCXX versions the system's libstdc++ lacks, for which a patched copy of
          /// libLibTorchSharp.so was loaded (the libstdc++ workaround); empty when none was needed.
          PatchedVersions: string list
          /// Whether glibc's mmap and trim thresholds were raised (MallocTuningVariable not "0").
          MallocTuned: bool
          /// The libtorch packages found in NuGet's folder ("libtorch-cpu-linux-x64 2.10.0").
          LibTorchPackages: string list }

    let private libTorchPackages () =
        nativeSearchDirectories ()
        |> List.choose (fun dir ->
            // .../<package>/<version>/runtimes/linux-x64/native
            let parts = dir.Split(Path.DirectorySeparatorChar)
            if parts.Length >= 5 && parts[parts.Length - 5].StartsWith "libtorch-" then
                Some(sprintf "%s %s" parts[parts.Length - 5] parts[parts.Length - 4])
            else None)
        |> List.distinct

    let private start () : StartInfo =
        let tuned = RuntimeInformation.IsOSPlatform OSPlatform.Linux && Environment.GetEnvironmentVariable MallocTuningVariable <> "0"
        let mutable patched = []
        if RuntimeInformation.IsOSPlatform OSPlatform.Linux then
            tuneAllocator ()
            let dirs = nativeSearchDirectories ()
            match findFile dirs ((=) torchSharpLibrary), systemLibStdCxx () with
            | Some torchSharp, Some libstdcxx ->
                let available = File.ReadAllText(libstdcxx, Encoding.Latin1)
                let missing =
                    versionNeeds (File.ReadAllBytes torchSharp)
                    |> List.map snd
                    |> List.filter (fun v -> v.StartsWith "GLIBCXX_" && not (available.Contains(v + "\000")))
                    |> List.distinct
                if not missing.IsEmpty then
                    // Load libtorch first (it brings its own libgomp), then the patched copy.
                    let nativeDir = Path.GetDirectoryName torchSharp
                    let libtorchDirs = nativeDir :: dirs
                    for name in [ "libgomp"; "libc10.so"; "libtorch_cpu.so"; "libtorch.so" ] do
                        match findFile libtorchDirs (fun f -> f.StartsWith name && f.Contains ".so") with
                        | Some path -> NativeLibrary.Load path |> ignore
                        | None -> ()
                    NativeLibrary.Load(patchedCopy torchSharp missing) |> ignore
                    patched <- missing
            | _ -> ()
        { PatchedVersions = patched; MallocTuned = tuned; LibTorchPackages = libTorchPackages () }

    let private started = lazy (start ())

    /// Makes sure TorchSharp's native libraries can start on this system. Idempotent and thread-safe;
    /// every entry point of the library calls it before touching a tensor.
    let ensure () = started.Force() |> ignore

    /// What starting did (starting first if needed).
    let startInfo () : StartInfo = started.Force()
