//! Standard `process_*` metrics read from procfs at scrape time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Reads `/proc/self` on each scrape. On systems without procfs it reports nothing.
#[derive(Debug)]
pub struct ProcessCollector {
    page_size: f64,
    ticks_per_sec: f64,
    boot_time: f64,
}

impl ProcessCollector {
    pub fn new() -> Self {
        // SAFETY: sysconf only reads a configuration value.
        let (page, ticks) = unsafe {
            (
                libc::sysconf(libc::_SC_PAGESIZE),
                libc::sysconf(libc::_SC_CLK_TCK),
            )
        };
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(0.0);
        Self {
            page_size: if page > 0 { page as f64 } else { 4096.0 },
            ticks_per_sec: if ticks > 0 { ticks as f64 } else { 100.0 },
            boot_time,
        }
    }
}

struct Stat {
    cpu_seconds: f64,
    threads: f64,
    start_seconds: f64,
    vsize: f64,
    rss_bytes: f64,
}

impl ProcessCollector {
    fn stat(&self) -> Option<Stat> {
        let s = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        // `rest` starts at field 3 (state), so field N is at index N - 3.
        Some(Stat {
            cpu_seconds: (num(14 - 3)? + num(15 - 3)?) / self.ticks_per_sec,
            threads: num(20 - 3)?,
            start_seconds: self.boot_time + num(22 - 3)? / self.ticks_per_sec,
            vsize: num(23 - 3)?,
            rss_bytes: num(24 - 3)? * self.page_size,
        })
    }
}

fn max_fds() -> Option<f64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0).then_some(lim.rlim_cur as f64)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(st) = self.stat() {
            let c = ConstCounter::new(st.cpu_seconds);
            let m = enc.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
            gauge(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                st.rss_bytes,
            )?;
            gauge(
                &mut enc,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                st.vsize,
            )?;
            gauge(
                &mut enc,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                st.start_seconds,
            )?;
            gauge(
                &mut enc,
                "process_threads",
                "Number of OS threads in the process",
                st.threads,
            )?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut enc,
                "process_open_fds",
                "Number of open file descriptors",
                dir.count() as f64,
            )?;
        }
        if let Some(max) = max_fds() {
            gauge(
                &mut enc,
                "process_max_fds",
                "Maximum number of open file descriptors",
                max,
            )?;
        }
        Ok(())
    }
}
