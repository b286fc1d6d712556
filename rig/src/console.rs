//! Console capture: every line timestamped, one capture file per case per
//! console, started BEFORE power on so nothing of the boot is lost.
//!
//! Line format: `[2026-11-21T07:50:12.345678Z +1.234567] text` (UTC wall clock of
//! the line's first byte, seconds since the capture started). A partial last line
//! is flushed when the capture stops.

use crate::error::RigError;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Where console bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A serial port (opened when the capture starts).
    Serial {
        /// Device path.
        path: String,
        /// Baud rate.
        baud: u32,
    },
    /// A file another process appends to (a simulated host's COM1), read from
    /// its length at capture start onwards.
    Tail(PathBuf),
    /// A serial port served over the network (RFC 2217, or raw TCP), connected
    /// and set up when the capture starts.
    Net {
        /// Host.
        host: String,
        /// TCP port.
        port: u16,
        /// Baud rate.
        baud: u32,
        /// Raw TCP instead of RFC 2217.
        raw: bool,
    },
}

/// UTC timestamp `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn utc_stamp(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Splits bytes into timestamped lines.
pub struct LineStamper<W: Write> {
    out: W,
    start: Instant,
    line: Vec<u8>,
    line_t: Option<(SystemTime, Instant)>,
    /// Lines written.
    pub lines: u64,
}

impl<W: Write> LineStamper<W> {
    /// Stamp into `out`, times relative to now.
    pub fn new(out: W) -> Self {
        LineStamper {
            out,
            start: Instant::now(),
            line: Vec::new(),
            line_t: None,
            lines: 0,
        }
    }

    /// Feed bytes.
    pub fn feed(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        for &b in bytes {
            if self.line_t.is_none() {
                self.line_t = Some((SystemTime::now(), Instant::now()));
            }
            match b {
                b'\n' => self.emit()?,
                b'\r' => {}
                _ => self.line.push(b),
            }
        }
        self.out.flush()
    }

    fn emit(&mut self) -> std::io::Result<()> {
        let (wall, mono) = self
            .line_t
            .take()
            .unwrap_or((SystemTime::now(), Instant::now()));
        let rel = mono.duration_since(self.start).as_secs_f64();
        let text = String::from_utf8_lossy(&self.line);
        writeln!(self.out, "[{} +{rel:.6}] {text}", utc_stamp(wall))?;
        self.line.clear();
        self.lines += 1;
        Ok(())
    }

    /// Flush a partial line; return the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        if !self.line.is_empty() {
            self.emit()?;
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

/// What a finished capture holds.
#[derive(Debug, Clone)]
pub struct CaptureSummary {
    /// The capture file.
    pub path: PathBuf,
    /// Lines captured.
    pub lines: u64,
}

/// A running capture of one console into one file.
pub struct Capture {
    host: String,
    console: String,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<(u64, bool), CaptureError>>,
    /// Disconnected when the capture thread has ended (its sender dropped).
    ended: std::sync::mpsc::Receiver<()>,
}

/// Splits a console stream at an end marker: the bytes before it are the
/// console's, the marker and whatever follows it are not. Bytes that could be
/// the start of the marker are held back until the next bytes tell.
#[derive(Debug, Clone)]
pub struct EndMarker {
    marker: Vec<u8>,
    held: Vec<u8>,
}

impl EndMarker {
    /// Watch for `marker` (not empty).
    pub fn new(marker: &[u8]) -> EndMarker {
        EndMarker {
            marker: marker.to_vec(),
            held: Vec::new(),
        }
    }

    /// Feed `data`: the bytes now known to be console text, and whether the
    /// marker has been seen (nothing after it is returned).
    pub fn push(&mut self, data: &[u8]) -> (Vec<u8>, bool) {
        self.held.extend_from_slice(data);
        let m = &self.marker;
        if !m.is_empty() {
            if let Some(i) = self.held.windows(m.len()).position(|w| w == &m[..]) {
                self.held.truncate(i);
                return (std::mem::take(&mut self.held), true);
            }
        }
        // Keep the longest tail that is a proper prefix of the marker.
        let keep = (1..m.len())
            .rev()
            .find(|&k| self.held.ends_with(&m[..k]))
            .unwrap_or(0);
        let out = self.held.drain(..self.held.len() - keep).collect();
        (out, false)
    }

    /// The bytes held back (the stream ended without the marker).
    pub fn rest(self) -> Vec<u8> {
        self.held
    }
}

/// Why a console capture stopped.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Reading the console failed.
    #[error("reading: {0}")]
    Read(std::io::Error),
    /// Writing the capture file failed.
    #[error("writing capture: {0}")]
    Write(std::io::Error),
}

impl Capture {
    /// Start capturing `source` (console `console` of `host`) into `path`
    /// (created/truncated; a symlink, FIFO or hard link there is refused). Returns once the source is open and reading, so a
    /// power-on after this call is captured from its first byte.
    pub fn start(
        host: &str,
        console: &str,
        source: Source,
        path: &Path,
    ) -> Result<Capture, RigError> {
        Capture::start_inner(host, console, source, path, None)
    }

    /// [`Capture::start`], ending by itself at `marker`: what the line carried
    /// before it is kept, the marker and anything after it are not. Whoever
    /// writes on the line after its last output (the step agent, after the VMM
    /// exited) writes the marker; [`Capture::finish`] waits for it. Make the
    /// marker unguessable (a fresh nonce), so nothing printed before it can
    /// end the capture early.
    pub fn start_until(
        host: &str,
        console: &str,
        source: Source,
        path: &Path,
        marker: &[u8],
    ) -> Result<Capture, RigError> {
        Capture::start_inner(host, console, source, path, Some(EndMarker::new(marker)))
    }

    fn start_inner(
        host: &str,
        console: &str,
        source: Source,
        path: &Path,
        mut until: Option<EndMarker>,
    ) -> Result<Capture, RigError> {
        let label = format!("console/{console}");
        // A symlink, FIFO or hard link planted at the path is refused.
        let file = hilrig_device::secure::create_output_file(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        // A file at its end reads nothing at once: poll it. A port's read waits
        // for bytes itself (its timeout), so the next bytes are taken at once.
        let polled = matches!(source, Source::Tail(_));
        let mut reader: Box<dyn Read + Send> = match source {
            Source::Serial { path: dev, baud } => {
                let p = serialport::new(&dev, baud)
                    .timeout(Duration::from_millis(20))
                    .open()
                    .map_err(|e| {
                        RigError::driver(host, &label, format!("cannot open {dev}: {e}"))
                    })?;
                // What the line held before this capture (an earlier run's tail)
                // is not this capture's.
                p.clear(serialport::ClearBuffer::Input)
                    .map_err(|e| RigError::driver(host, &label, format!("flushing {dev}: {e}")))?;
                Box::new(p)
            }
            Source::Net {
                host: h,
                port,
                baud,
                raw,
            } => {
                let protocol = if raw {
                    crate::rfc2217::Protocol::Raw
                } else {
                    crate::rfc2217::Protocol::Rfc2217
                };
                Box::new(
                    crate::rfc2217::NetSerialPort::connect(
                        &h,
                        port,
                        protocol,
                        crate::rfc2217::LineSettings::n81(baud),
                        Duration::from_secs(5),
                    )
                    .map_err(|e| RigError::driver(host, &label, e.to_string()))?,
                )
            }
            Source::Tail(p) => {
                let mut f = std::fs::OpenOptions::new()
                    .read(true)
                    .append(true)
                    .create(true)
                    .open(&p)
                    .map_err(|e| {
                        RigError::driver(host, &label, format!("cannot open {}: {e}", p.display()))
                    })?;
                f.seek(SeekFrom::End(0)).map_err(|e| {
                    RigError::driver(host, &label, format!("seeking {}: {e}", p.display()))
                })?;
                Box::new(f)
            }
        };
        let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("console-{host}-{console}"))
            .spawn(move || {
                // Dropped when the thread ends: `ended` then disconnects.
                let _ended = ended_tx;
                let mut stamper = LineStamper::new(std::io::BufWriter::new(file));
                let mut buf = [0u8; 4096];
                let mut seen = false;
                loop {
                    // Drain what is there before honouring stop, so bytes written
                    // before stop() are kept.
                    let stopping = st.load(Ordering::Relaxed);
                    let t0 = Instant::now();
                    let n = match reader.read(&mut buf) {
                        Ok(n) => n,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::Interrupted
                            ) =>
                        {
                            0
                        }
                        Err(e) => return Err(CaptureError::Read(e)),
                    };
                    if n > 0 {
                        let (text, end) = match &mut until {
                            Some(u) => u.push(&buf[..n]),
                            None => (buf[..n].to_vec(), false),
                        };
                        stamper.feed(&text).map_err(CaptureError::Write)?;
                        if end {
                            seen = true;
                            break;
                        }
                        continue;
                    }
                    if stopping {
                        break;
                    }
                    if polled {
                        std::thread::sleep(Duration::from_millis(10));
                    } else if t0.elapsed() < Duration::from_millis(1) {
                        // A port that returned at once without bytes: no spin.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                if let Some(u) = until.take() {
                    stamper.feed(&u.rest()).map_err(CaptureError::Write)?;
                }
                let lines = stamper.lines;
                let extra = stamper.finish().map_err(CaptureError::Write);
                extra.map(|_| (lines, seen))
            })
            .map_err(|e| RigError::io("starting a console thread", e))?;
        Ok(Capture {
            host: host.to_string(),
            console: console.to_string(),
            path: path.to_path_buf(),
            stop,
            thread,
            ended,
        })
    }

    /// The capture file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop, flush and close; errors name the host and console.
    pub fn stop(self) -> Result<CaptureSummary, RigError> {
        self.finish(Duration::ZERO).map(|(s, _)| s)
    }

    /// Wait at most `max` for the end marker of [`Capture::start_until`] (the
    /// line's last bytes on their way through it), then stop, flush and close.
    /// Whether the marker came: without it the capture holds what the line
    /// carried until `max` ran out.
    pub fn finish(self, max: Duration) -> Result<(CaptureSummary, bool), RigError> {
        if !max.is_zero() {
            // Ok(()) is never sent: this returns when the thread has ended, or at `max`.
            let _ = self.ended.recv_timeout(max);
        }
        self.stop.store(true, Ordering::Relaxed);
        let label = format!("console/{}", self.console);
        let r = self
            .thread
            .join()
            .map_err(|_| RigError::driver(&self.host, &label, "capture thread panicked"))?;
        let (lines, seen) = r.map_err(|e| RigError::driver(&self.host, &label, e.to_string()))?;
        // Count the flushed partial line too.
        let lines = std::fs::read_to_string(&self.path)
            .map(|s| s.lines().count() as u64)
            .unwrap_or(lines);
        Ok((
            CaptureSummary {
                path: self.path,
                lines,
            },
            seen,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(
            utc_stamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(utc_stamp(t), "2026-11-18T11:06:40.000000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(utc_stamp(t).starts_with("2000-02-29T00:00:00"));
    }

    #[test]
    fn lines_are_stamped_and_partial_lines_kept() {
        let mut s = LineStamper::new(Vec::new());
        s.feed(b"one\r\ntw").unwrap();
        s.feed(b"o\nthr").unwrap();
        let out = String::from_utf8(s.finish().unwrap()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with('[') && lines[0].ends_with("] one"),
            "{out}"
        );
        assert!(
            lines[1].ends_with("] two") && lines[2].ends_with("] thr"),
            "{out}"
        );
    }

    #[test]
    fn tail_capture_keeps_everything_written_after_start() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("com1");
        std::fs::write(&src, "old boot\n").unwrap();
        let cap = Capture::start(
            "h",
            "com1",
            Source::Tail(src.clone()),
            &d.path().join("case.log"),
        )
        .unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&src).unwrap();
        f.write_all(b"first\nsecond\nno newline").unwrap();
        let sum = cap.stop().unwrap();
        let text = std::fs::read_to_string(&sum.path).unwrap();
        assert_eq!(sum.lines, 3, "{text}");
        assert!(!text.contains("old boot"));
        assert!(text.contains("] first") && text.contains("] no newline"));
    }

    #[test]
    fn end_marker_splits_the_stream_across_reads() {
        let mut m = EndMarker::new(b"END-42");
        // A prefix of the marker is held back until the next bytes tell.
        assert_eq!(m.push(b"last line\nEN"), (b"last line\n".to_vec(), false));
        // Not the marker after all (another nonce): it is console text.
        assert_eq!(m.push(b"D-41 x E"), (b"END-41 x ".to_vec(), false));
        // The marker across two reads: the text before it kept, nothing after.
        assert_eq!(m.push(b"ND"), (Vec::new(), false));
        assert_eq!(m.push(b"-42tail"), (Vec::new(), true));
        let mut m = EndMarker::new(b"END-42");
        assert_eq!(m.push(b"abc END-4"), (b"abc ".to_vec(), false));
        assert_eq!(m.rest(), b"END-4");
        // An empty marker never ends anything and holds nothing back.
        let mut m = EndMarker::new(b"");
        assert_eq!(m.push(b"x"), (b"x".to_vec(), false));
    }

    /// The capture ends at the marker written after the last output: the last
    /// line, written right before the marker without a newline, is kept; a
    /// marker with another nonce printed earlier does not end it.
    #[test]
    fn capture_until_its_marker_keeps_the_last_line() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("com1");
        std::fs::write(&src, "").unwrap();
        let marker = b"HILRIG-CONSOLE-END-00ff";
        let cap = Capture::start_until(
            "h",
            "com1",
            Source::Tail(src.clone()),
            &d.path().join("case.log"),
            marker,
        )
        .unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&src).unwrap();
        f.write_all(b"boot\nHILRIG-CONSOLE-END-00fe\nlast words")
            .unwrap();
        f.write_all(marker).unwrap();
        f.write_all(b"\nafter the end\n").unwrap();
        let t0 = Instant::now();
        let (sum, seen) = cap.finish(Duration::from_secs(20)).unwrap();
        assert!(seen, "the marker was not seen");
        assert!(t0.elapsed() < Duration::from_secs(10));
        let text = std::fs::read_to_string(&sum.path).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .map(|l| l.split_once("] ").unwrap().1)
            .collect();
        assert_eq!(
            lines,
            ["boot", "HILRIG-CONSOLE-END-00fe", "last words"],
            "{text}"
        );
        // No marker at all: the capture ends at the bound with what came.
        let cap = Capture::start_until(
            "h",
            "com1",
            Source::Tail(src.clone()),
            &d.path().join("case2.log"),
            marker,
        )
        .unwrap();
        f.write_all(b"more\n").unwrap();
        let (sum, seen) = cap.finish(Duration::from_millis(200)).unwrap();
        assert!(!seen);
        assert!(std::fs::read_to_string(&sum.path)
            .unwrap()
            .ends_with("] more\n"));
    }
}
