//! The iCE40 tool flow: verilator lint, yosys `synth_ice40`, nextpnr-ice40, icepack.
//!
//! Every step writes its log into the output directory and fails with an error that
//! names the step, the tool and the log file. A missing tool is reported with the
//! Debian package that provides it.

use crate::board::{pll_verilog, pll_wrapper, Board, PLL_MODULE, PLL_WRAPPER};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A flow step failed.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// A tool is not installed (or not on `PATH`).
    #[error("{tool} is not installed (not found on PATH): install the Debian package `{package}` (apt-get install {package})")]
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// A tool could not be started for another reason.
    #[error("could not run {tool}: {source}")]
    Spawn {
        /// The program.
        tool: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done ("writing", "reading").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A tool exited with an error.
    #[error("{step}: {tool} failed ({status}); log {log}:\n{tail}")]
    ToolFailed {
        /// The flow step.
        step: &'static str,
        /// The program.
        tool: &'static str,
        /// Exit status text.
        status: String,
        /// The full log.
        log: PathBuf,
        /// The last lines of the log (errors first if any).
        tail: String,
    },
    /// A tool ran past its time limit and was stopped.
    #[error("{step}: {tool} did not finish within {limit_s} s (for nextpnr: routing does not converge, the design is too congested for the part; try another --seed, a smaller design or a bigger part); log {log}:\n{tail}")]
    Timeout {
        /// The flow step.
        step: &'static str,
        /// The program.
        tool: &'static str,
        /// The limit.
        limit_s: u64,
        /// The log.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// A tool stopped making progress (nextpnr's router going round in circles) and
    /// was stopped.
    #[error("{step}: {tool} made no progress for {window_s} s (routing stuck at {progress} arcs/overused wires: the design is congested for the part) and was stopped; log {log}")]
    Stalled {
        /// The flow step.
        step: &'static str,
        /// The program.
        tool: &'static str,
        /// The window.
        window_s: u64,
        /// The best progress figure reached.
        progress: u64,
        /// The log.
        log: PathBuf,
    },
    /// Place and route failed with every seed tried.
    #[error("place-and-route: no seed of {seeds:?} routed: {last}")]
    NoSeedRouted {
        /// The seeds tried.
        seeds: Vec<u64>,
        /// The last failure.
        #[source]
        last: Box<FlowError>,
    },
    /// Verilator reported warnings or errors that no waiver covers.
    #[error("lint: verilator reported {count} unwaived warning(s)/error(s); log {log}:\n{first}")]
    Lint {
        /// How many.
        count: usize,
        /// The log.
        log: PathBuf,
        /// The first few messages.
        first: String,
    },
    /// Synthesis inferred latches.
    #[error("synth: yosys inferred latches (a combinational block does not assign every path); log {log}:\n{lines}")]
    Latches {
        /// The log.
        log: PathBuf,
        /// The offending log lines.
        lines: String,
    },
    /// Synthesis found undriven wires or other `check` problems.
    #[error("synth: yosys `check` found {problems} problem(s) (undriven wires, multiple drivers, logic loops); log {log}:\n{lines}")]
    Check {
        /// The count `check` reported.
        problems: usize,
        /// The log.
        log: PathBuf,
        /// The offending log lines.
        lines: String,
    },
    /// The design does not fit the board's part.
    #[error("{step}: the design needs {needed} {resource} but the {device} of board {board} has {available}")]
    Utilisation {
        /// Where it was found (synth or place-and-route).
        step: &'static str,
        /// Board name.
        board: &'static str,
        /// Part name.
        device: String,
        /// LUT4 / ICESTORM_LC / block RAM.
        resource: &'static str,
        /// Needed.
        needed: u64,
        /// Available.
        available: u64,
    },
    /// A tool's output could not be understood.
    #[error("{step}: cannot read {what} from {path}: {detail}")]
    Parse {
        /// The flow step.
        step: &'static str,
        /// What was looked for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Details.
        detail: String,
    },
}

/// An external program of the flow, with the Debian package that provides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// Program name.
    pub program: &'static str,
    /// Debian package.
    pub package: &'static str,
}

/// yosys.
pub const YOSYS: Tool = Tool {
    program: "yosys",
    package: "yosys",
};
/// nextpnr-ice40.
pub const NEXTPNR: Tool = Tool {
    program: "nextpnr-ice40",
    package: "nextpnr-ice40",
};
/// icepack.
pub const ICEPACK: Tool = Tool {
    program: "icepack",
    package: "fpga-icestorm",
};
/// verilator.
pub const VERILATOR: Tool = Tool {
    program: "verilator",
    package: "verilator",
};
/// iverilog (not run by the flow; used by the RTL tests of hilrig-fpga and hilrig-board).
pub const IVERILOG: Tool = Tool {
    program: "iverilog",
    package: "iverilog",
};

/// The environment variable that overrides a tool's path: `HILRIG_YOSYS` etc.
fn tool_program(t: Tool) -> PathBuf {
    let var = format!(
        "HILRIG_{}",
        t.program.to_ascii_uppercase().replace('-', "_")
    );
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(t.program))
}

/// Whether `t` can be started (`--version` / `-V` runs).
pub fn tool_available(t: Tool) -> bool {
    let arg = if t.program == "yosys" || t.program == "iverilog" {
        "-V"
    } else {
        "--version"
    };
    Command::new(tool_program(t))
        .arg(arg)
        .output()
        .map(|_| true)
        .unwrap_or(false)
}

/// Run `t` with `args` in `dir`, stdout+stderr to `log`; error unless it exits 0.
fn run_tool(
    step: &'static str,
    t: Tool,
    args: &[String],
    dir: &Path,
    log: &Path,
) -> Result<String, FlowError> {
    run_tool_timeout(step, t, args, dir, log, None, None)
}

/// Progress watchdog: `metric` reads the log and returns a figure that falls as the
/// tool progresses (nextpnr: arcs left to route, overused wires); when its minimum has
/// not fallen for `window`, the tool is stopped.
#[derive(Clone, Copy)]
struct Watchdog {
    window: Duration,
    metric: fn(&str) -> Option<u64>,
}

/// The routing progress figure of a nextpnr log: router1's remaining arcs or
/// router2's overused wires, minimum over the log so far.
pub fn nextpnr_route_progress(log: &str) -> Option<u64> {
    let mut best: Option<u64> = None;
    for l in log.lines() {
        let v = if let Some(rest) = l.split("overused=").nth(1) {
            rest.split_whitespace().next().and_then(|x| x.parse().ok())
        } else {
            let f: Vec<&str> = l.split('|').collect();
            if f.len() >= 5
                && f[0]
                    .trim_start_matches("Info:")
                    .trim()
                    .parse::<u64>()
                    .is_ok()
            {
                f[3].trim().parse().ok()
            } else {
                None
            }
        };
        if let Some(v) = v {
            best = Some(best.map_or(v, |b: u64| b.min(v)));
        }
    }
    best
}

/// [`run_tool`] with a time limit: past it the tool is killed and the step fails
/// with [`FlowError::Timeout`].
fn run_tool_timeout(
    step: &'static str,
    t: Tool,
    args: &[String],
    dir: &Path,
    log: &Path,
    limit: Option<Duration>,
    watchdog: Option<Watchdog>,
) -> Result<String, FlowError> {
    let io = |source| FlowError::Io {
        what: "writing",
        path: log.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(log).map_err(io)?;
    let file2 = file.try_clone().map_err(io)?;
    let t0 = Instant::now();
    let mut child = Command::new(tool_program(t))
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(file)
        .stderr(file2)
        .spawn()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                FlowError::ToolMissing {
                    tool: t.program,
                    package: t.package,
                }
            } else {
                FlowError::Spawn {
                    tool: t.program,
                    source,
                }
            }
        })?;
    let (mut best, mut best_at, mut last_check) = (None, Instant::now(), Instant::now());
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(source) => {
                return Err(FlowError::Spawn {
                    tool: t.program,
                    source,
                })
            }
        }
        if let Some(w) = watchdog {
            if last_check.elapsed() >= Duration::from_secs(2) {
                last_check = Instant::now();
                let text = std::fs::read(log).unwrap_or_default();
                let m = (w.metric)(&String::from_utf8_lossy(&text));
                if m.is_some() && (best.is_none() || m < best) {
                    best = m;
                    best_at = Instant::now();
                }
                if best.is_some() && best_at.elapsed() > w.window {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(FlowError::Stalled {
                        step,
                        tool: t.program,
                        window_s: w.window.as_secs(),
                        progress: best.unwrap_or(0),
                        log: log.to_path_buf(),
                    });
                }
            }
        }
        if let Some(limit) = limit {
            if t0.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                let text = std::fs::read(log).unwrap_or_default();
                return Err(FlowError::Timeout {
                    step,
                    tool: t.program,
                    limit_s: limit.as_secs(),
                    log: log.to_path_buf(),
                    tail: tail_with_errors(&String::from_utf8_lossy(&text)),
                });
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = String::from_utf8_lossy(&std::fs::read(log).map_err(|source| FlowError::Io {
        what: "reading",
        path: log.to_path_buf(),
        source,
    })?)
    .into_owned();
    if !status.success() {
        return Err(FlowError::ToolFailed {
            step,
            tool: t.program,
            status: status.to_string(),
            log: log.to_path_buf(),
            tail: tail_with_errors(&text),
        });
    }
    Ok(text)
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), FlowError> {
    std::fs::write(path, data).map_err(|source| FlowError::Io {
        what: "writing",
        path: path.to_path_buf(),
        source,
    })
}

fn read_file(path: &Path) -> Result<String, FlowError> {
    std::fs::read_to_string(path).map_err(|source| FlowError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })
}

/// The `ERROR` lines of a log, or its last 20 lines.
fn tail_with_errors(text: &str) -> String {
    let errs: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("ERROR") || l.starts_with("%Error"))
        .take(20)
        .collect();
    if !errs.is_empty() {
        return errs.join("\n");
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn abs(p: &Path) -> Result<PathBuf, FlowError> {
    std::path::absolute(p).map_err(|source| FlowError::Io {
        what: "resolving",
        path: p.to_path_buf(),
        source,
    })
}

fn mkdir(p: &Path) -> Result<PathBuf, FlowError> {
    std::fs::create_dir_all(p).map_err(|source| FlowError::Io {
        what: "creating directory",
        path: p.to_path_buf(),
        source,
    })?;
    abs(p)
}

// ---------------------------------------------------------------------------------
// Lint

/// One verilator waiver: a rule switched off for files matching a glob, optionally
/// only for messages matching a pattern. Each carries the reason it is benign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiver {
    /// Verilator warning name (`WIDTH`, `UNUSEDSIGNAL`, ...).
    pub rule: &'static str,
    /// File glob (verilator config `-file`), e.g. `*/device_core.v`.
    pub file: String,
    /// Message glob (verilator config `-match`), if narrower than the whole file.
    pub matching: Option<String>,
    /// Why this is benign.
    pub reason: &'static str,
}

/// The waivers for a rust-hdl generated file (matched by `file_glob`, e.g.
/// `*/device_core.v`). Nothing is waived in any other file.
pub fn rust_hdl_waivers(file_glob: &str) -> Vec<Waiver> {
    let w = |rule, matching: Option<&str>, reason| Waiver {
        rule,
        file: file_glob.to_string(),
        matching: matching.map(str::to_string),
        reason,
    };
    vec![
        w(
            "WIDTH",
            None,
            "rust-hdl writes Bits<N> arithmetic and constants with Verilog's context widths (e.g. 32'h.. into a 5-bit reg, an 18-bit add into 18 bits); the truncation is rust-hdl's wrapping semantics, which the rust-hdl simulation and the Icarus differential test check",
        ),
        w(
            "UNUSEDPARAM",
            None,
            "rust-hdl emits every variant of a state enum as a localparam in each module that has the enum, used or not",
        ),
        w(
            "UNUSEDSIGNAL",
            None,
            "rust-hdl declares every port of every sub-block, so unused outputs (frame_error, busy) and RAM address bits above a smaller RAM's depth appear as unused; synthesis removes them",
        ),
        w(
            "DECLFILENAME",
            None,
            "rust-hdl writes the whole hierarchy (top$sub$...) into one file",
        ),
        w(
            "UNOPTFLAT",
            Some("*sha$dsel*"),
            "the OOB engine and the SHA unit answer each other combinationally through separate always blocks (dsel -> dbyte -> dsel); verilator sees a loop at signal level, there is none at bit level (yosys `check` finds no logic loop and the Icarus test runs)",
        ),
    ]
}

/// The verilator configuration file text for `waivers`.
pub fn waiver_config(waivers: &[Waiver]) -> String {
    let mut s = String::from("`verilator_config\n");
    for w in waivers {
        s.push_str(&format!("// {}\n", w.reason));
        match &w.matching {
            Some(m) => s.push_str(&format!(
                "lint_off -rule {} -file \"{}\" -match \"{}\"\n",
                w.rule, w.file, m
            )),
            None => s.push_str(&format!("lint_off -rule {} -file \"{}\"\n", w.rule, w.file)),
        }
    }
    s
}

/// What the lint found.
#[derive(Debug, Clone)]
pub struct LintReport {
    /// The verilator log.
    pub log: PathBuf,
    /// The waiver config used.
    pub config: PathBuf,
    /// Time taken.
    pub elapsed: Duration,
}

/// `verilator --lint-only -Wall` (Verilog-2005) on `files` with `top`; fails on any
/// message that `waivers` do not cover. Writes `lint.log` and `lint_waivers.vlt`
/// into `out_dir`.
pub fn lint(
    files: &[PathBuf],
    top: &str,
    waivers: &[Waiver],
    out_dir: &Path,
) -> Result<LintReport, FlowError> {
    let t0 = Instant::now();
    let out = mkdir(out_dir)?;
    let config = out.join("lint_waivers.vlt");
    write_file(&config, waiver_config(waivers).as_bytes())?;
    let log = out.join("lint.log");
    let mut args: Vec<String> = vec![
        "--lint-only".into(),
        "-Wall".into(),
        // rust-hdl writes Verilog-2005 (it names ports `byte`, a SystemVerilog keyword).
        "--default-language".into(),
        "1364-2005".into(),
        "--top-module".into(),
        top.into(),
        config.display().to_string(),
    ];
    for f in files {
        args.push(abs(f)?.display().to_string());
    }
    match run_tool("lint", VERILATOR, &args, &out, &log) {
        Ok(text) => {
            // Exit 0 with warnings cannot happen under -Wall (warnings are fatal),
            // but check anyway.
            let msgs = lint_messages(&text);
            if !msgs.is_empty() {
                return Err(lint_error(&msgs, &log));
            }
        }
        Err(FlowError::ToolFailed { tail, .. }) => {
            let text = read_file(&log).unwrap_or(tail);
            let msgs = lint_messages(&text);
            return Err(if msgs.is_empty() {
                FlowError::ToolFailed {
                    step: "lint",
                    tool: VERILATOR.program,
                    status: "error".into(),
                    log,
                    tail: tail_with_errors(&text),
                }
            } else {
                lint_error(&msgs, &log)
            });
        }
        Err(e) => return Err(e),
    }
    Ok(LintReport {
        log,
        config,
        elapsed: t0.elapsed(),
    })
}

fn lint_messages(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| {
            (l.starts_with("%Warning-") || l.starts_with("%Error"))
                && !l.starts_with("%Error: Exiting due to")
        })
        .collect()
}

fn lint_error(msgs: &[&str], log: &Path) -> FlowError {
    FlowError::Lint {
        count: msgs.len(),
        log: log.to_path_buf(),
        first: msgs.iter().take(10).copied().collect::<Vec<_>>().join("\n"),
    }
}

// ---------------------------------------------------------------------------------
// Synthesis

/// Cell counts after `synth_ice40`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SynthReport {
    /// `SB_LUT4` cells.
    pub luts: u64,
    /// Flip-flops (`SB_DFF*`).
    pub flip_flops: u64,
    /// `SB_CARRY` cells.
    pub carries: u64,
    /// `SB_RAM40_4K` cells.
    pub brams: u64,
    /// `SB_LUT4` cells with one net on two inputs (from `x + x` in the RTL: an adder
    /// whose carry LUTs get both operands from one net). nextpnr 0.4's router1 can
    /// loop forever on these; write `x << 1` instead.
    pub dup_input_luts: u64,
    /// The netlist.
    pub json: PathBuf,
    /// The yosys log.
    pub log: PathBuf,
    /// Time taken.
    pub elapsed: Duration,
}

/// Latch and check findings in a yosys log.
fn synth_problems(log_text: &str, log: &Path) -> Result<(), FlowError> {
    // "No latch inferred ..." lines are fine; the `$_DLATCH_*` techmap templates
    // are always read. A real latch is a "Latch inferred" line (and a latch cell in
    // `stat`, checked by the caller).
    let latches: Vec<&str> = log_text
        .lines()
        .filter(|l| l.trim_start().starts_with("Latch inferred for"))
        .take(20)
        .collect();
    if !latches.is_empty() {
        return Err(FlowError::Latches {
            log: log.to_path_buf(),
            lines: latches.join("\n"),
        });
    }
    let mut problems = 0usize;
    for l in log_text.lines() {
        if let Some(rest) = l.trim().strip_prefix("Found and reported ") {
            if let Some(n) = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<usize>().ok())
            {
                problems = problems.max(n);
            }
        }
    }
    let bad: Vec<&str> = log_text
        .lines()
        .filter(|l| {
            l.contains("is used but has no driver")
                || l.contains("multiple conflicting drivers")
                || l.contains("found logic loop")
        })
        .take(20)
        .collect();
    if problems > 0 || !bad.is_empty() {
        return Err(FlowError::Check {
            problems: problems.max(bad.len()),
            log: log.to_path_buf(),
            lines: bad.join("\n"),
        });
    }
    Ok(())
}

/// Parse the cell table of a yosys `stat` (text) output: `(cell type, count)`.
pub fn parse_stat(text: &str) -> Vec<(String, u64)> {
    let mut cells = Vec::new();
    let mut in_cells = false;
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with("Number of cells:") {
            in_cells = true;
            continue;
        }
        if in_cells {
            let mut it = t.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some(name), Some(n), None) if name.starts_with(['S', '$']) => {
                    match n.parse::<u64>() {
                        Ok(n) => cells.push((name.to_string(), n)),
                        Err(_) => in_cells = false,
                    }
                }
                _ => in_cells = false,
            }
        }
    }
    cells
}

/// `yosys synth_ice40 -top <top> -json`, then `check` and `stat`; fails on latches,
/// `check` problems, or more LUT4s / block RAMs than the board's part has.
pub fn synth(
    files: &[PathBuf],
    top: &str,
    board: &Board,
    out_dir: &Path,
) -> Result<SynthReport, FlowError> {
    let t0 = Instant::now();
    let out = mkdir(out_dir)?;
    let mut reads = String::new();
    for f in files {
        reads.push_str(&format!("read_verilog {}; ", quote(&abs(f)?)));
    }
    if let Some(p) = &board.pll {
        let pll = out.join(format!("{PLL_MODULE}.v"));
        write_file(&pll, pll_verilog(p).as_bytes())?;
        reads.push_str(&format!("read_verilog {}; ", quote(&pll)));
    }
    let json = out.join(format!("{top}.json"));
    let stat = out.join("stat.txt");
    let script = format!(
        "{reads}synth_ice40 -top {top} -json {json}; check; tee -q -o {stat} stat",
        json = quote(&json),
        stat = quote(&stat),
    );
    let log = out.join("yosys.log");
    let text = run_tool("synth", YOSYS, &["-p".to_string(), script], &out, &log)?;
    synth_problems(&text, &log)?;
    let stat_text = read_file(&stat)?;
    let cells = parse_stat(&stat_text);
    if cells.is_empty() {
        return Err(FlowError::Parse {
            step: "synth",
            what: "the cell counts of `stat`",
            path: stat,
            detail: "no cell table".into(),
        });
    }
    let count = |f: &dyn Fn(&str) -> bool| -> u64 {
        cells.iter().filter(|(n, _)| f(n)).map(|(_, c)| *c).sum()
    };
    let latch_cells = count(&|n| n.contains("DLATCH") || n.contains("dlatch"));
    if latch_cells > 0 {
        return Err(FlowError::Latches {
            log: stat,
            lines: format!("{latch_cells} latch cell(s) in `stat`"),
        });
    }
    let netlist = read_file(&json)?;
    let dup_input_luts = count_dup_input_luts(&netlist).map_err(|e| FlowError::Parse {
        step: "synth",
        what: "the netlist",
        path: json.clone(),
        detail: e.to_string(),
    })?;
    let r = SynthReport {
        dup_input_luts,
        luts: count(&|n| n == "SB_LUT4"),
        flip_flops: count(&|n| n.starts_with("SB_DFF")),
        carries: count(&|n| n == "SB_CARRY"),
        brams: count(&|n| n.starts_with("SB_RAM40")),
        json,
        log,
        elapsed: t0.elapsed(),
    };
    check_fit("synth", &r, board)?;
    Ok(r)
}

/// Why a tool's JSON report or netlist could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonReportError {
    /// Not JSON (serde_json's message, with line and column).
    #[error("{0}")]
    Json(String),
    /// A member the report must have is missing or of the wrong type.
    #[error("no {0}")]
    Missing(String),
}

impl From<serde_json::Error> for JsonReportError {
    fn from(e: serde_json::Error) -> Self {
        JsonReportError::Json(e.to_string())
    }
}

/// `SB_LUT4` cells of a yosys JSON netlist with the same net on two inputs.
pub fn count_dup_input_luts(json: &str) -> Result<u64, JsonReportError> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let modules = v
        .get("modules")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| JsonReportError::Missing("\"modules\" object".into()))?;
    let mut n = 0;
    for m in modules.values() {
        let Some(cells) = m.get("cells").and_then(serde_json::Value::as_object) else {
            continue;
        };
        for c in cells.values() {
            if c.get("type").and_then(serde_json::Value::as_str) != Some("SB_LUT4") {
                continue;
            }
            let Some(conn) = c.get("connections") else {
                continue;
            };
            let mut bits: Vec<u64> = ["I0", "I1", "I2", "I3"]
                .iter()
                .filter_map(|p| conn.get(*p)?.get(0)?.as_u64())
                .collect();
            let all = bits.len();
            bits.sort_unstable();
            bits.dedup();
            if bits.len() != all {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Whether the synthesized cell counts fit `board`'s part: LUT4s and block RAMs.
pub fn check_fit(step: &'static str, r: &SynthReport, board: &Board) -> Result<(), FlowError> {
    fits(step, board, "LUT4", r.luts, u64::from(board.device.luts()))?;
    fits(
        step,
        board,
        "block RAMs",
        r.brams,
        u64::from(board.device.brams()),
    )
}

fn fits(
    step: &'static str,
    board: &Board,
    resource: &'static str,
    needed: u64,
    available: u64,
) -> Result<(), FlowError> {
    if needed > available {
        return Err(FlowError::Utilisation {
            step,
            board: board.name,
            device: format!("{:?}", board.device),
            resource,
            needed,
            available,
        });
    }
    Ok(())
}

fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.contains([' ', ';', '"']) {
        format!("\"{s}\"")
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------
// Place and route

/// One clock domain's timing after place and route.
#[derive(Debug, Clone, PartialEq)]
pub struct ClockTiming {
    /// Net name as nextpnr reports it.
    pub net: String,
    /// Achieved fmax, MHz.
    pub fmax_mhz: f64,
    /// The frequency it must reach, MHz.
    pub target_mhz: f64,
}

impl ClockTiming {
    /// Whether fmax reaches the target.
    pub fn met(&self) -> bool {
        self.fmax_mhz >= self.target_mhz
    }
}

/// Place-and-route figures.
#[derive(Debug, Clone, PartialEq)]
pub struct PnrReport {
    /// The placer seed that routed.
    pub seed: u64,
    /// Logic cells used (`ICESTORM_LC`).
    pub logic_cells: u64,
    /// Logic cells available.
    pub logic_cells_available: u64,
    /// Block RAMs used (`ICESTORM_RAM`).
    pub brams: u64,
    /// Block RAMs available.
    pub brams_available: u64,
    /// Per clock.
    pub clocks: Vec<ClockTiming>,
    /// The placed-and-routed ASCII bitstream.
    pub asc: PathBuf,
    /// nextpnr's JSON report.
    pub report: PathBuf,
    /// The nextpnr log.
    pub log: PathBuf,
    /// Time taken.
    pub elapsed: Duration,
}

impl PnrReport {
    /// Whether every clock meets its target.
    pub fn timing_met(&self) -> bool {
        !self.clocks.is_empty() && self.clocks.iter().all(ClockTiming::met)
    }
}

/// Parse nextpnr's `--report` JSON: `utilization` and `fmax`. Targets come from the
/// report's `constraint` per clock, or `default_mhz` where it is missing.
pub fn parse_nextpnr_report(
    text: &str,
    default_mhz: f64,
) -> Result<(u64, u64, u64, u64, Vec<ClockTiming>), JsonReportError> {
    let missing = |what: String| JsonReportError::Missing(what);
    let v: serde_json::Value = serde_json::from_str(text)?;
    let util = v
        .get("utilization")
        .ok_or_else(|| missing("\"utilization\" object".into()))?;
    let used_avail = |k: &str| -> Result<(u64, u64), JsonReportError> {
        let o = util
            .get(k)
            .ok_or_else(|| missing(format!("utilization.{k}")))?;
        let used = o
            .get("used")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| missing(format!("utilization.{k}.used")))?;
        let avail = o
            .get("available")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| missing(format!("utilization.{k}.available")))?;
        Ok((used, avail))
    };
    let (lc, lca) = used_avail("ICESTORM_LC")?;
    let (ram, rama) = used_avail("ICESTORM_RAM")?;
    let mut clocks = Vec::new();
    if let Some(f) = v.get("fmax").and_then(serde_json::Value::as_object) {
        for (net, o) in f {
            let fmax = o
                .get("achieved")
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| missing(format!("fmax.{net}.achieved")))?;
            let target = o
                .get("constraint")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(default_mhz);
            clocks.push(ClockTiming {
                net: net.clone(),
                fmax_mhz: fmax,
                target_mhz: target,
            });
        }
    }
    Ok((lc, lca, ram, rama, clocks))
}

/// Parse `Max frequency for clock 'X': F MHz (PASS|FAIL at T MHz)` lines of a
/// nextpnr log (the last pass wins), for nextpnr without `--report`.
pub fn parse_nextpnr_log_fmax(log: &str) -> Vec<ClockTiming> {
    let mut out: Vec<ClockTiming> = Vec::new();
    for l in log.lines() {
        let Some(rest) = l.split("Max frequency for clock").nth(1) else {
            continue;
        };
        let mut q = rest.split('\'');
        let (Some(_), Some(net), Some(tail)) = (q.next(), q.next(), q.next()) else {
            continue;
        };
        let nums: Vec<f64> = tail
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter_map(|s| s.parse().ok())
            .collect();
        if let [fmax, target, ..] = nums[..] {
            out.retain(|c| c.net != net);
            out.push(ClockTiming {
                net: net.to_string(),
                fmax_mhz: fmax,
                target_mhz: target,
            });
        }
    }
    out
}

/// nextpnr settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PnrOptions {
    /// Placer seeds, tried in order while routing stalls.
    pub seeds: Vec<u64>,
    /// Router (`router1` or `router2`).
    pub router: String,
    /// Kill nextpnr after this long (a congested design can route forever).
    pub timeout: Duration,
    /// Give up on a seed when routing has not improved for this long.
    pub stall: Duration,
    /// With a PLL on the board: wrap the (PLL-free) top in [`PLL_WRAPPER`], which
    /// clocks it from the PLL (see [`pll_wrapper`]); without this the top must
    /// instantiate [`PLL_MODULE`] itself.
    pub wrap_pll: bool,
}

impl Default for PnrOptions {
    fn default() -> Self {
        PnrOptions {
            seeds: vec![1, 2, 3, 4],
            router: "router1".into(),
            timeout: Duration::from_secs(30 * 60),
            stall: Duration::from_secs(90),
            wrap_pll: false,
        }
    }
}

/// nextpnr-ice40 with the board's part, package and PCF, `--freq` at the core clock;
/// writes `<top>.asc`, `report.json`, `nextpnr.log` and `<board>.pcf`. A design too
/// large for the part fails with [`FlowError::Utilisation`].
pub fn place_and_route(
    netlist: &Path,
    top: &str,
    board: &Board,
    out_dir: &Path,
    opts: &PnrOptions,
    seed: u64,
) -> Result<PnrReport, FlowError> {
    let t0 = Instant::now();
    let out = mkdir(out_dir)?;
    let pcf = out.join(format!("{}.pcf", board.name));
    write_file(&pcf, board.pcf().as_bytes())?;
    let asc = out.join(format!("{top}.asc"));
    let report = out.join("report.json");
    let log = out.join("nextpnr.log");
    let mhz = board.core_clock_mhz();
    let args: Vec<String> = vec![
        board.device.nextpnr_flag().into(),
        "--package".into(),
        board.package.into(),
        "--pcf".into(),
        pcf.display().to_string(),
        "--json".into(),
        abs(netlist)?.display().to_string(),
        "--asc".into(),
        asc.display().to_string(),
        "--freq".into(),
        format!("{mhz}"),
        "--report".into(),
        report.display().to_string(),
        "--seed".into(),
        seed.to_string(),
        "--router".into(),
        opts.router.clone(),
        // Timing is judged here from the report, not by nextpnr's exit status.
        "--timing-allow-fail".into(),
    ];
    let text = match run_tool_timeout(
        "place-and-route",
        NEXTPNR,
        &args,
        &out,
        &log,
        Some(opts.timeout),
        Some(Watchdog {
            window: opts.stall,
            metric: nextpnr_route_progress,
        }),
    ) {
        Ok(t) => t,
        Err(FlowError::ToolFailed { .. }) => {
            let text = read_file(&log)?;
            if let Some(e) = pnr_utilisation(&text, board) {
                return Err(e);
            }
            return Err(FlowError::ToolFailed {
                step: "place-and-route",
                tool: NEXTPNR.program,
                status: "error".into(),
                log,
                tail: tail_with_errors(&text),
            });
        }
        Err(e) => return Err(e),
    };
    let parsed = read_file(&report).and_then(|r| {
        parse_nextpnr_report(&r, mhz).map_err(|e| FlowError::Parse {
            step: "place-and-route",
            what: "utilisation and fmax",
            path: report.clone(),
            detail: e.to_string(),
        })
    });
    let (logic_cells, lca, brams, ba, mut clocks) = parsed?;
    if clocks.is_empty() {
        clocks = parse_nextpnr_log_fmax(&text);
    }
    if clocks.is_empty() {
        return Err(FlowError::Parse {
            step: "place-and-route",
            what: "the fmax of any clock",
            path: log,
            detail: "no clock in the report or the log".into(),
        });
    }
    Ok(PnrReport {
        seed,
        logic_cells,
        logic_cells_available: lca,
        brams,
        brams_available: ba,
        clocks,
        asc,
        report,
        log,
        elapsed: t0.elapsed(),
    })
}

/// nextpnr's "Design uses X of Y" / "Unable to place" failures as a utilisation error.
fn pnr_utilisation(log: &str, board: &Board) -> Option<FlowError> {
    for l in log.lines() {
        // "Info: 	         ICESTORM_LC:  7148/ 5280   135%"
        let t = l.trim_start_matches("Info:").trim();
        for (k, resource) in [
            ("ICESTORM_LC:", "ICESTORM_LC"),
            ("ICESTORM_RAM:", "block RAMs"),
        ] {
            if let Some(rest) = t.strip_prefix(k) {
                let mut it = rest.split('/');
                let used = it.next().and_then(|s| s.trim().parse::<u64>().ok());
                let avail = it
                    .next()
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse::<u64>().ok());
                if let (Some(u), Some(a)) = (used, avail) {
                    if u > a {
                        return Some(FlowError::Utilisation {
                            step: "place-and-route",
                            board: board.name,
                            device: format!("{:?}", board.device),
                            resource,
                            needed: u,
                            available: a,
                        });
                    }
                }
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------
// Pack and the whole flow

/// `icepack <asc> <bin>`.
pub fn pack(asc: &Path, bin: &Path) -> Result<(), FlowError> {
    let dir = bin.parent().unwrap_or(Path::new("."));
    let log = dir.join("icepack.log");
    run_tool(
        "pack",
        ICEPACK,
        &[
            abs(asc)?.display().to_string(),
            abs(bin)?.display().to_string(),
        ],
        dir,
        &log,
    )?;
    Ok(())
}

/// Everything the flow produced.
#[derive(Debug, Clone)]
pub struct FlowReport {
    /// Board name.
    pub board: &'static str,
    /// Board oscillator, MHz.
    pub board_clock_mhz: f64,
    /// The core clock timing is checked against, MHz (board clock or PLL output).
    pub core_clock_mhz: f64,
    /// Whether the core clock comes from the PLL.
    pub pll: bool,
    /// yosys figures.
    pub synth: SynthReport,
    /// nextpnr figures.
    pub pnr: PnrReport,
    /// The bitstream.
    pub bitstream: PathBuf,
    /// Whole-flow time.
    pub elapsed: Duration,
}

impl FlowReport {
    /// Whether every clock meets its target.
    pub fn timing_met(&self) -> bool {
        self.pnr.timing_met()
    }
}

impl fmt::Display for FlowReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "board:      {}", self.board)?;
        writeln!(
            f,
            "LUT4:       {} (yosys); logic cells {}/{} (nextpnr)",
            self.synth.luts, self.pnr.logic_cells, self.pnr.logic_cells_available
        )?;
        writeln!(f, "flip-flops: {}", self.synth.flip_flops)?;
        if self.synth.dup_input_luts > 0 {
            writeln!(
                f,
                "warning:    {} LUT4 with one net on two inputs (`x + x` in the RTL; nextpnr's router can hang on them: write `x << 1`)",
                self.synth.dup_input_luts
            )?;
        }
        writeln!(
            f,
            "BRAM:       {}/{}",
            self.pnr.brams, self.pnr.brams_available
        )?;
        let clock = if self.pll {
            format!(
                "{:.3} MHz from the PLL ({} MHz board clock)",
                self.core_clock_mhz, self.board_clock_mhz
            )
        } else {
            format!("{} MHz board clock", self.board_clock_mhz)
        };
        writeln!(f, "clock:      {clock}")?;
        for c in &self.pnr.clocks {
            writeln!(
                f,
                "fmax:       {:.2} MHz on {} vs {:.2} MHz: {}",
                c.fmax_mhz,
                c.net,
                c.target_mhz,
                if c.met() { "met" } else { "NOT MET" }
            )?;
        }
        writeln!(
            f,
            "timing:     {}",
            if self.timing_met() { "met" } else { "NOT MET" }
        )?;
        writeln!(f, "bitstream:  {}", self.bitstream.display())?;
        write!(
            f,
            "time:       {:.1} s (synth {:.1} s, place-and-route {:.1} s with seed {})",
            self.elapsed.as_secs_f64(),
            self.synth.elapsed.as_secs_f64(),
            self.pnr.elapsed.as_secs_f64(),
            self.pnr.seed
        )
    }
}

/// Synthesis, place and route, and packing of `files` (top `top`) for `board` into
/// `out_dir`; the bitstream is `<out_dir>/<top>.bin`. Timing not met is reported in
/// the result ([`FlowReport::timing_met`]), not as an error.
pub fn build(
    files: &[PathBuf],
    top: &str,
    board: &Board,
    out_dir: &Path,
    opts: &PnrOptions,
) -> Result<FlowReport, FlowError> {
    let t0 = Instant::now();
    let mut files = files.to_vec();
    let mut top = top.to_string();
    if board.pll.is_some() && opts.wrap_pll {
        let out = mkdir(out_dir)?;
        let w = out.join(format!("{PLL_WRAPPER}.v"));
        write_file(&w, pll_wrapper(&top).as_bytes())?;
        files.push(w);
        top = PLL_WRAPPER.to_string();
    }
    let top = top.as_str();
    let synth = synth(&files, top, board, out_dir)?;
    let mut pnr = None;
    let mut last = None;
    for &seed in &opts.seeds {
        match place_and_route(&synth.json, top, board, out_dir, opts, seed) {
            Ok(r) => {
                pnr = Some(r);
                break;
            }
            Err(e @ (FlowError::Stalled { .. } | FlowError::Timeout { .. })) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    let Some(pnr) = pnr else {
        return Err(FlowError::NoSeedRouted {
            seeds: opts.seeds.clone(),
            last: Box::new(last.unwrap_or(FlowError::Parse {
                step: "place-and-route",
                what: "seeds",
                path: out_dir.to_path_buf(),
                detail: "no seed given".into(),
            })),
        });
    };
    let bitstream = abs(&out_dir.join(format!("{top}.bin")))?;
    pack(&pnr.asc, &bitstream)?;
    Ok(FlowReport {
        board: board.name,
        board_clock_mhz: board.clock_mhz,
        core_clock_mhz: board.core_clock_mhz(),
        pll: board.pll.is_some(),
        synth,
        pnr,
        bitstream,
        elapsed: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_names_its_debian_package() {
        let t = Tool {
            program: "hilrig-no-such-tool",
            package: "hilrig-pkg",
        };
        let dir = tempfile::tempdir().unwrap();
        let e = run_tool("synth", t, &[], dir.path(), &dir.path().join("x.log")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hilrig-no-such-tool is not installed (not found on PATH): install the Debian package `hilrig-pkg` (apt-get install hilrig-pkg)"
        );
        assert!(!tool_available(t));
    }

    #[test]
    fn a_tool_past_its_limit_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tool {
            program: "sleep",
            package: "coreutils",
        };
        let t0 = Instant::now();
        let e = run_tool_timeout(
            "place-and-route",
            t,
            &["30".to_string()],
            dir.path(),
            &dir.path().join("sleep.log"),
            Some(Duration::from_millis(300)),
            None,
        )
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(
            e.to_string()
                .starts_with("place-and-route: sleep did not finish within 0 s"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_lut_inputs_are_counted() {
        let j = r#"{"modules":{"t":{"cells":{
            "a":{"type":"SB_LUT4","connections":{"I0":[5],"I1":[7],"I2":[7],"I3":["0"]}},
            "b":{"type":"SB_LUT4","connections":{"I0":[5],"I1":[6],"I2":["0"],"I3":["0"]}},
            "c":{"type":"SB_CARRY","connections":{"I0":[7],"I1":[7]}}}}}}"#;
        assert_eq!(count_dup_input_luts(j), Ok(1));
        assert!(count_dup_input_luts("[]").is_err());
    }

    #[test]
    fn stat_cells_parse() {
        let s = "=== core_top ===\n\n   Number of wires:  3282\n   Number of cells:               9165\n     SB_CARRY                     1454\n     SB_DFF                        218\n     SB_LUT4                      5411\n     SB_RAM40_4K                    11\n\nEnd\n";
        let c = parse_stat(s);
        assert_eq!(c.len(), 4);
        assert_eq!(c[2], ("SB_LUT4".to_string(), 5411));
    }

    #[test]
    fn latches_and_check_problems_are_found() {
        let log = Path::new("y.log");
        let ok = "Generating RTLIL representation for module `\\$_DLATCH_N_'.\n2.39.1. Executing Verilog-2005 frontend: /usr/share/yosys/ice40/latches_map.v\nNo latch inferred for signal `\\a' from process\nFound and reported 0 problems.\n";
        assert!(synth_problems(ok, log).is_ok());
        let latch = format!("{ok}Latch inferred for signal `\\top.\\q' from process `\\top.$proc$a.v:3$1': $auto$proc_dlatch.cc:427$2\n");
        let e = synth_problems(&latch, log).unwrap_err();
        assert!(matches!(e, FlowError::Latches { .. }), "{e}");
        assert!(e.to_string().contains("top.\\q"), "{e}");
        let undriven =
            "Warning: Wire top.\\w is used but has no driver.\nFound and reported 1 problems.\n";
        let e = synth_problems(undriven, log).unwrap_err();
        assert!(e.to_string().contains("is used but has no driver"), "{e}");
    }

    #[test]
    fn nextpnr_report_and_log_parse() {
        let r = r#"{"utilization":{"ICESTORM_LC":{"available":7680,"used":7148},"ICESTORM_RAM":{"available":32,"used":11}},
            "fmax":{"clock$SB_IO_IN_$glb_clk":{"achieved":41.5,"constraint":100.0}}}"#;
        let (lc, lca, ram, rama, clocks) = parse_nextpnr_report(r, 12.0).unwrap();
        assert_eq!((lc, lca, ram, rama), (7148, 7680, 11, 32));
        assert_eq!(clocks[0].fmax_mhz, 41.5);
        assert!(!clocks[0].met());
        let e = parse_nextpnr_report("{}", 1.0).unwrap_err();
        assert_eq!(e, JsonReportError::Missing("\"utilization\" object".into()));
        assert!(e.to_string().contains("utilization"), "{e}");
        assert!(parse_nextpnr_report("not json", 1.0).is_err());
        let log = "Info: Max frequency for clock 'clock$SB_IO_IN_$glb_clk': 38.10 MHz (FAIL at 100.00 MHz)\nInfo: Max frequency for clock 'clock$SB_IO_IN_$glb_clk': 52.61 MHz (PASS at 50.00 MHz)\n";
        let c = parse_nextpnr_log_fmax(log);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].fmax_mhz, c[0].target_mhz), (52.61, 50.0));
        assert!(c[0].met());
    }

    #[test]
    fn route_progress_reads_both_routers() {
        let r1 = "Info:    IterCnt |  w/ripup   wo/ripup |  w/r  wo/r |      arcs| batch(sec) total(sec)|\nInfo:       1000 |      143        856 |  143   856 |     21642|       0.71       0.71|\nInfo:       2000 |      206       1793 |   63   937 |     20732|       0.46       1.17|\n";
        assert_eq!(nextpnr_route_progress(r1), Some(20732));
        let r2 = "Info:     iter=319 wires=82070 overused=5 overuse=5 archfail=NA\nInfo:     iter=320 wires=82071 overused=7 overuse=7 archfail=NA\n";
        assert_eq!(nextpnr_route_progress(r2), Some(5));
        assert_eq!(nextpnr_route_progress("Info: placing\n"), None);
    }

    #[test]
    fn pnr_overflow_is_a_utilisation_error() {
        let b = crate::board::icebreaker();
        let log = "Info: Device utilisation:\nInfo: \t         ICESTORM_LC:  7148/ 5280   135%\nERROR: Unable to place cell\n";
        let e = pnr_utilisation(log, &b).unwrap();
        assert!(e.to_string().contains("needs 7148 ICESTORM_LC"), "{e}");
    }

    #[test]
    fn waiver_config_is_scoped() {
        let c = waiver_config(&rust_hdl_waivers("*/gen.v"));
        assert!(c.contains("lint_off -rule WIDTH -file \"*/gen.v\"\n"));
        assert!(c.contains("-match \"*sha$dsel*\""));
        assert!(!c.contains("-file \"*\""));
    }
}
