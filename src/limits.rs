//! Resource limits as users write and read them: memory (`512M`, `2G`: binary units, as
//! Docker reads them), CPUs (`0.5`, `2`), process counts and durations (`90s`, `15m`), and the
//! limits builds run under by default. Owns parsing and display only; the runtime applies
//! limits (`berth_runtime::Limits`) and the store keeps what a user set.

use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LimitsError {
    #[error("{0:?} is not a memory size — write it like 512M or 2G (at least 16M)")]
    Memory(String),
    #[error("{0:?} is not a CPU count — write it like 0.5 or 2 (between 0.01 and 1024)")]
    Cpus(String),
    #[error("{0:?} is not a process count — write a number between 16 and 1000000")]
    Pids(String),
    #[error("{0:?} is not a duration — write it like 90s, 15m or 1h (between 10s and 24h)")]
    Duration(String),
}

/// Parses a memory size such as `512M` or `2G` into bytes.
pub fn parse_memory(text: &str) -> Result<u64, LimitsError> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(text)
        .ok()
        .filter(|bytes| *bytes >= 16 << 20)
        .ok_or_else(|| LimitsError::Memory(text.to_string()))
}

/// Parses a CPU count such as `0.5` into thousandths of a CPU.
pub fn parse_cpus(text: &str) -> Result<u64, LimitsError> {
    text.parse::<f64>()
        .ok()
        .filter(|cpus| (0.01..=1024.0).contains(cpus))
        .map(|cpus| (cpus * 1000.0).round() as u64)
        .ok_or_else(|| LimitsError::Cpus(text.to_string()))
}

/// Parses a process count.
pub fn parse_pids(text: &str) -> Result<i64, LimitsError> {
    text.parse::<i64>()
        .ok()
        .filter(|pids| (16..=1_000_000).contains(pids))
        .ok_or_else(|| LimitsError::Pids(text.to_string()))
}

/// Parses a duration such as `15m`.
pub fn parse_duration(text: &str) -> Result<Duration, LimitsError> {
    humantime::parse_duration(text)
        .ok()
        .filter(|d| (Duration::from_secs(10)..=Duration::from_secs(86_400)).contains(d))
        .ok_or_else(|| LimitsError::Duration(text.to_string()))
}

/// A memory size as people read it: `512 MiB`, `2 GiB`.
pub fn format_memory(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// A CPU count in thousandths as people read it: `0.5`, `2`.
pub fn format_cpus(millis: u64) -> String {
    format!("{}", millis as f64 / 1000.0)
}

/// Memory, CPU and process limits of one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Limits {
    pub memory: u64,
    pub cpu_millis: u64,
    pub pids: i64,
}

impl Limits {
    /// A container of `process_type`'s: 512 MiB (Heroku's standard dyno), one CPU, 1024
    /// processes, with what a user set for that type (`resources:set`, among `set`) over them.
    pub fn for_app(set: &[crate::store::ResourcesRow], process_type: &str) -> Self {
        let default = Self {
            memory: 512 << 20,
            cpu_millis: 1000,
            pids: 1024,
        };
        match set.iter().find(|row| row.process_type == process_type) {
            Some(row) => default.with(row.memory, row.cpu_millis, row.pids),
            None => default,
        }
    }

    /// These limits with the values a user set over them.
    fn with(self, memory: Option<i64>, cpu_millis: Option<i64>, pids: Option<i64>) -> Self {
        Self {
            memory: unsigned(memory).unwrap_or(self.memory),
            cpu_millis: unsigned(cpu_millis).unwrap_or(self.cpu_millis),
            pids: pids.unwrap_or(self.pids),
        }
    }

    /// As the runtime applies them.
    pub fn runtime(&self) -> berth_runtime::Limits {
        berth_runtime::Limits {
            memory: i64::try_from(self.memory).ok(),
            cpu_millis: Some(self.cpu_millis),
            pids: Some(self.pids),
        }
    }

    /// `512 MiB, 1 CPU, 1024 pids`.
    pub fn describe(&self) -> String {
        format!(
            "{}, {} CPU, {} pids",
            format_memory(self.memory),
            format_cpus(self.cpu_millis),
            self.pids
        )
    }
}

fn unsigned(value: Option<i64>) -> Option<u64> {
    value.and_then(|v| u64::try_from(v).ok())
}

/// The limits one build runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildLimits {
    pub limits: Limits,
    pub timeout: Duration,
}

impl BuildLimits {
    /// 2 GiB, every CPU of the host, 4096 processes, 15 minutes (Heroku's build timeout), with
    /// what a user set (`builds:set`) over them.
    pub fn with(set: &crate::store::BuildLimitsRow) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let default = Limits {
            memory: 2 << 30,
            cpu_millis: cpus * 1000,
            pids: 4096,
        };
        Self {
            limits: default.with(set.memory, set.cpu_millis, set.pids),
            timeout: unsigned(set.timeout_secs)
                .map_or(Duration::from_secs(15 * 60), Duration::from_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_users_write_and_refuses_the_rest() {
        assert_eq!(parse_memory("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory("2G").unwrap(), 2 << 30);
        assert_eq!(parse_memory("1.5GiB").unwrap(), 3 << 29);
        for bad in ["", "lots", "1M", "-2G"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cpus("0.5").unwrap(), 500);
        assert_eq!(parse_cpus("2").unwrap(), 2000);
        for bad in ["0", "-1", "x", "5000"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_pids("256").unwrap(), 256);
        assert!(parse_pids("3").is_err());
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        for bad in ["1s", "2d", "soon"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_memory(2 << 30), "2 GiB");
        assert_eq!(format_memory(512 << 20), "512 MiB");
        assert_eq!(format_cpus(500), "0.5");
    }
}
