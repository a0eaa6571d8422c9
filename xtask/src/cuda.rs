//! `cargo xtask cuda-env` and `cargo xtask cuda-build`: build the `cuda`
//! feature on a machine with no system CUDA and no GPU, from NVIDIA's pip
//! wheels.
//!
//! Only the CUDA 13 wheels carry a complete `nvcc`, so the toolkit is pinned
//! to 13.0: cudarc 0.19 accepts CUDA 11.4 to 13.x, and a 580 driver runs 13.0
//! code. Everything lands in one folder (by default `target/cuda-toolchain`,
//! which git ignores); nothing global changes. candle turns on cudarc's
//! `dynamic-linking`, so the linker wants `libcuda.so`, which only a driver
//! ships: a stub with an empty function for every `cu*` name in the wheel's
//! `cuda.h` stands in for it at link time, and the real driver's
//! `libcuda.so.1` is used at run time.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::value_of;

pub const HELP: &str = "\
cuda-env     fetch NVIDIA's CUDA 13.0 pip wheels into DIR, make a libcuda.so
             link stub and the unversioned library links, and print the
             shell lines to build the cuda feature:
             eval \"$(cargo xtask cuda-env)\"
             --dir DIR ($CARGO_TARGET_DIR or target, then /cuda-toolchain),
             --compute-cap N (90)
cuda-build   cuda-env, then cargo build --release -p noprop-cli --features
             cuda (target dir target/cuda unless CARGO_TARGET_DIR is set)
             --check (cargo check instead), --dir DIR, --compute-cap N (90)";

/// The wheels that built the `cuda` feature, pinned together: nvcc with the
/// headers (`crt`, `cccl`) and back end (`nvvm`) it needs, and the runtime
/// libraries candle links.
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-nvvm==13.0.88",
    "nvidia-cublas==13.0.2.14",
    "nvidia-curand==10.4.0.35",
    "nvidia-cuda-nvrtc==13.0.88",
];

/// Libraries the link names without a version (`-lcudart`), which the wheels
/// ship only with one (`libcudart.so.13`).
const UNVERSIONED: &[&str] = &["cudart", "cublas", "cublasLt", "curand", "nvrtc"];

/// Where the pieces of a prepared toolchain live.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaEnv {
    /// The wheels' `nvidia/cu13` folder: `bin`, `include`, `lib`, `nvvm`.
    pub cuda_home: PathBuf,
    /// The libcuda stub and the unversioned links, for `-L native=`.
    pub link_dir: PathBuf,
    pub compute_cap: String,
}

impl CudaEnv {
    fn new(dir: &Path, compute_cap: &str) -> Self {
        Self {
            cuda_home: dir.join("python/nvidia/cu13"),
            link_dir: dir.join("link"),
            compute_cap: compute_cap.to_string(),
        }
    }

    fn rustflags(&self) -> String {
        format!("-L native={}", self.link_dir.display())
    }

    /// The variables to set, given the current `PATH` and `RUSTFLAGS`.
    pub fn vars(&self, path: &str, rustflags: &str) -> Vec<(&'static str, String)> {
        let bin = self.cuda_home.join("bin").display().to_string();
        let home = self.cuda_home.display().to_string();
        let ours = self.rustflags();
        let rustflags = if rustflags.contains(&ours) {
            rustflags.to_string()
        } else {
            [ours.as_str(), rustflags].join(" ").trim().to_string()
        };
        vec![
            (
                "PATH",
                if path.is_empty() {
                    bin
                } else {
                    format!("{bin}:{path}")
                },
            ),
            ("CUDA_HOME", home.clone()),
            ("CUDA_PATH", home),
            ("CUDA_COMPUTE_CAP", self.compute_cap.clone()),
            ("RUSTFLAGS", rustflags),
        ]
    }

    /// `export` lines for a POSIX shell to eval. `PATH` and `RUSTFLAGS` keep
    /// what the shell has at eval time.
    pub fn shell_lines(&self) -> String {
        let bin = self.cuda_home.join("bin").display().to_string();
        let home = self.cuda_home.display().to_string();
        format!(
            "export PATH={}:\"$PATH\"\n\
             export CUDA_HOME={}\n\
             export CUDA_PATH={}\n\
             export CUDA_COMPUTE_CAP={}\n\
             export RUSTFLAGS={}\"${{RUSTFLAGS:+ $RUSTFLAGS}}\"\n",
            sh_quote(&bin),
            sh_quote(&home),
            sh_quote(&home),
            sh_quote(&self.compute_cap),
            sh_quote(&self.rustflags()),
        )
    }
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// C source for the link stub: one empty function per `cu*` name in
/// `cuda_h`. The linker only checks that each symbol the program references
/// exists; the real driver provides them at run time.
///
/// Every token of the form `cu[A-Z]...` counts, not only the declarations:
/// the versioned symbols cudarc links (`cuMemAlloc_v2`) appear only in
/// `#define cuMemAlloc cuMemAlloc_v2` lines, and an extra empty function
/// costs nothing.
pub fn stub_source(cuda_h: &str) -> String {
    let names: BTreeSet<&str> = cuda_h
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| {
            t.strip_prefix("cu")
                .and_then(|rest| rest.chars().next())
                .is_some_and(|c| c.is_ascii_uppercase())
        })
        .collect();
    let mut src = String::from(
        "/* Generated by `cargo xtask cuda-env` from cuda.h: a link-time stand-in\n   \
         for the driver's libcuda.so. Never load it at run time. */\n",
    );
    for name in names {
        src.push_str(&format!("void {name}(void) {{}}\n"));
    }
    src
}

#[derive(Debug)]
struct Options {
    dir: PathBuf,
    compute_cap: String,
    check: bool,
}

/// The cargo target folder: `CARGO_TARGET_DIR`, else `target` in the
/// workspace.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// Parses the options of `cuda-env` (`allow_check` false) or `cuda-build`;
/// the wheels go to `cuda-toolchain` in `target` unless `--dir` says.
fn options(args: &[String], target: &Path, allow_check: bool) -> Result<Options> {
    let mut o = Options {
        dir: target.join("cuda-toolchain"),
        compute_cap: "90".into(),
        check: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => o.dir = PathBuf::from(value_of(&mut it, "--dir")?),
            "--compute-cap" => {
                let v = value_of(&mut it, "--compute-cap")?;
                if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric()) {
                    bail!("--compute-cap {v:?}: expected a number such as 90 or 90a");
                }
                o.compute_cap = v;
            }
            "--check" if allow_check => o.check = true,
            other => bail!("unknown option {other:?}\n{HELP}"),
        }
    }
    // pip and the printed lines want an absolute path.
    if !o.dir.is_absolute() {
        o.dir = std::env::current_dir()?.join(&o.dir);
    }
    Ok(o)
}

/// `cargo xtask cuda-env`.
pub fn env(args: &[String], root: &Path) -> Result<()> {
    let opts = options(args, &target_dir(root), false)?;
    let env = prepare(&opts)?;
    print!("{}", env.shell_lines());
    Ok(())
}

/// Where `cuda-build` builds: `CARGO_TARGET_DIR`, else `target/cuda`
/// (RUSTFLAGS and the features differ from the CPU build's, so sharing
/// `target` would rebuild everything each time one switches).
pub fn build_target(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t),
        None => root.join("target/cuda"),
    }
}

/// `cargo xtask cuda-build`.
pub fn build(args: &[String], root: &Path) -> Result<()> {
    let opts = options(args, &target_dir(root), true)?;
    let check = opts.check;
    let env = prepare(&opts)?;
    let path = std::env::var("PATH").unwrap_or_default();
    let rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root);
    if check {
        cmd.args(["check", "-p", "noprop-cli", "--features", "cuda"]);
    } else {
        cmd.args([
            "build",
            "--release",
            "-p",
            "noprop-cli",
            "--features",
            "cuda",
        ]);
    }
    let target = build_target(root);
    cmd.env("CARGO_TARGET_DIR", &target);
    // candle-kernels' nvcc steps use half the cores unless told otherwise
    // (cudaforge's default); on a small machine that is one file at a time.
    if std::env::var_os("CUDAFORGE_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        cmd.env("CUDAFORGE_THREADS", n.to_string());
    }
    for (k, v) in env.vars(&path, &rustflags) {
        cmd.env(k, v);
    }
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!(
            "cargo {} with --features cuda failed",
            if check { "check" } else { "build" }
        );
    }
    if !check {
        eprintln!(
            "built {}; at run time it needs the driver's libcuda.so.1 and CUDA 13's \
             libcudart, libcublas, libcublasLt and libcurand on LD_LIBRARY_PATH \
             (e.g. {})",
            target.join("release/noprop").display(),
            env.cuda_home.join("lib").display()
        );
    }
    Ok(())
}

/// Makes sure the wheels, the stub and the links are in `opts.dir`; a run
/// that finds them all downloads and compiles nothing.
fn prepare(opts: &Options) -> Result<CudaEnv> {
    let env = CudaEnv::new(&opts.dir, &opts.compute_cap);
    install_wheels(&opts.dir, &env)?;
    make_stub(&env)?;
    make_links(&env)?;
    Ok(env)
}

fn install_wheels(dir: &Path, env: &CudaEnv) -> Result<()> {
    // The stamp records the pinned set that was installed, so a change to
    // WHEELS reinstalls and an interrupted install is not taken as done.
    let stamp = dir.join("wheels.txt");
    let want = WHEELS.join("\n") + "\n";
    let nvcc = env.cuda_home.join("bin/nvcc");
    if nvcc.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&python).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        _ => bail!("no Python: `{python} --version` failed (install python3 or set PYTHON)"),
    }
    eprintln!(
        "cuda-env: installing {} wheels into {}",
        WHEELS.len(),
        dir.display()
    );
    let target = dir.join("python");
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-deps", "--upgrade", "--target"])
        .arg(&target)
        .args(WHEELS)
        // stdout is for the lines the user evals.
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .with_context(|| format!("cannot run {python} -m pip"))?;
    if !status.success() {
        bail!(
            "pip failed to install the CUDA wheels into {}",
            target.display()
        );
    }
    if !nvcc.is_file() {
        bail!("the wheels installed but {} is missing", nvcc.display());
    }
    fs::write(&stamp, want).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(())
}

fn make_stub(env: &CudaEnv) -> Result<()> {
    let lib = env.link_dir.join("libcuda.so");
    let header = env.cuda_home.join("include/cuda.h");
    let fresh = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(l), Some(h)) = (fresh(&lib), fresh(&header)) {
        if l >= h {
            return Ok(());
        }
    }
    let cuda_h =
        fs::read_to_string(&header).with_context(|| format!("cannot read {}", header.display()))?;
    fs::create_dir_all(&env.link_dir)
        .with_context(|| format!("cannot create {}", env.link_dir.display()))?;
    let src = env.link_dir.join("libcuda_stub.c");
    fs::write(&src, stub_source(&cuda_h))
        .with_context(|| format!("cannot write {}", src.display()))?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());
    // The soname makes the binary ask for the driver's libcuda.so.1.
    let out = Command::new(&cc)
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(&lib)
        .arg(&src)
        .output();
    match out {
        Err(_) => bail!("no C compiler: cannot run `{cc}` (install gcc or set CC)"),
        Ok(out) if !out.status.success() => bail!(
            "{cc} failed to build the libcuda stub: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
        ),
        Ok(_) => Ok(()),
    }
}

fn make_links(env: &CudaEnv) -> Result<()> {
    let lib_dir = env.cuda_home.join("lib");
    let files: Vec<String> = fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot read {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    for name in UNVERSIONED {
        let target = versioned(&files, name)
            .with_context(|| format!("no lib{name}.so.N in {}", lib_dir.display()))?;
        let link = env.link_dir.join(format!("lib{name}.so"));
        let want = lib_dir.join(target);
        if fs::read_link(&link).is_ok_and(|t| t == want) {
            continue;
        }
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&want, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    Ok(())
}

/// The shortest `lib<name>.so.<digits...>` among `files`: the soname.
fn versioned<'a>(files: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("lib{name}.so.");
    files
        .iter()
        .filter(|f| {
            f.strip_prefix(&prefix)
                .is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        })
        .min_by_key(|f| f.len())
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CUDA_H: &str = r#"
#ifdef _WIN32
#define CUDAAPI __stdcall
#else
#define CUDAAPI
#endif
#define cuMemAlloc                          cuMemAlloc_v2
typedef struct CUctx_st *CUcontext;
typedef CUresult (CUDAAPI *PFN_cuInit)(unsigned int Flags);
/** Initialize, see ::cuDriverGetVersion. */
CUresult CUDAAPI cuInit(unsigned int Flags);
CUresult CUDAAPI cuDriverGetVersion(int *driverVersion);
CUresult CUDAAPI cuMemAlloc(CUdeviceptr *dptr, size_t bytesize);
extern cudaError_t cudaMalloc(void **p, size_t n);
"#;

    #[test]
    fn stub_has_each_cu_name_once_and_no_types() {
        let src = stub_source(CUDA_H);
        let fns: Vec<&str> = src.lines().filter(|l| l.starts_with("void ")).collect();
        assert_eq!(
            fns,
            [
                "void cuDriverGetVersion(void) {}",
                "void cuInit(void) {}",
                "void cuMemAlloc(void) {}",
                "void cuMemAlloc_v2(void) {}",
            ]
        );
    }

    #[test]
    fn shell_lines_quote_paths_and_keep_path_and_rustflags() {
        let env = CudaEnv::new(Path::new("/t/it's"), "90");
        assert_eq!(
            env.shell_lines(),
            "export PATH='/t/it'\\''s/python/nvidia/cu13/bin':\"$PATH\"\n\
             export CUDA_HOME='/t/it'\\''s/python/nvidia/cu13'\n\
             export CUDA_PATH='/t/it'\\''s/python/nvidia/cu13'\n\
             export CUDA_COMPUTE_CAP='90'\n\
             export RUSTFLAGS='-L native=/t/it'\\''s/link'\"${RUSTFLAGS:+ $RUSTFLAGS}\"\n"
        );
    }

    #[test]
    fn vars_prepend_once() {
        let env = CudaEnv::new(Path::new("/t"), "80");
        let vars = env.vars("/usr/bin", "-C target-cpu=native");
        assert_eq!(
            vars[0],
            ("PATH", "/t/python/nvidia/cu13/bin:/usr/bin".into())
        );
        assert_eq!(vars[3], ("CUDA_COMPUTE_CAP", "80".into()));
        assert_eq!(
            vars[4],
            ("RUSTFLAGS", "-L native=/t/link -C target-cpu=native".into())
        );
        let again = env.vars("/usr/bin", "-L native=/t/link");
        assert_eq!(again[4], ("RUSTFLAGS", "-L native=/t/link".into()));
    }

    #[test]
    fn options_reject_unknown_and_check_for_env() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = options(
            &args(&["--check", "--compute-cap", "80", "--dir", "/x"]),
            Path::new("/r/target"),
            true,
        )
        .unwrap();
        assert!(o.check);
        assert_eq!(
            (o.dir, o.compute_cap),
            (PathBuf::from("/x"), "80".to_string())
        );
        assert_eq!(
            options(&[], Path::new("/r/target"), false).unwrap().dir,
            PathBuf::from("/r/target/cuda-toolchain")
        );
        assert!(options(&args(&["--check"]), Path::new("/r/target"), false).is_err());
        assert!(options(&args(&["--compute-cap"]), Path::new("/r/target"), true).is_err());
        assert!(options(
            &args(&["--compute-cap", "9.0"]),
            Path::new("/r/target"),
            true
        )
        .is_err());
    }

    #[test]
    fn versioned_picks_the_soname() {
        let files: Vec<String> = [
            "libnvrtc.alt.so.13",
            "libnvrtc.so.13",
            "libnvrtc-builtins.so.13.0",
            "libcublasLt.so.13",
        ]
        .map(String::from)
        .into();
        assert_eq!(versioned(&files, "nvrtc"), Some("libnvrtc.so.13"));
        assert_eq!(versioned(&files, "cublas"), None);
        assert_eq!(versioned(&files, "cublasLt"), Some("libcublasLt.so.13"));
    }
}
