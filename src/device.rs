//! `--device auto|cpu|cuda[:N]|metal[:N]`: picks the compute device. `auto` takes CUDA, then
//! Metal, when tern was built with that feature and a device answers; otherwise the CPU.

use crate::error::{Error, Result};
use candle_core::Device;

pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => {
            let n: usize = n.parse().map_err(|_| {
                Error::Msg(format!("device '{spec}': ordinal '{n}' is not a number"))
            })?;
            (k.to_string(), n)
        }
        None => (spec.clone(), 0),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Msg(
                    "device 'cuda': this tern was built without the `cuda` feature \
                     (rebuild with `cargo build --release --features cuda`)"
                        .into(),
                ));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                return Err(Error::Msg(
                    "device 'metal': this tern was built without the `metal` feature".into(),
                ));
            }
            Ok(Device::new_metal(ordinal)?)
        }
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        other => Err(Error::Msg(format!(
            "device '{other}': expected one of auto, cpu, cuda[:N], metal[:N]"
        ))),
    }
}

/// The CPU's model name (Linux: /proc/cpuinfo), for benchmark records; "unknown" elsewhere.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// A device as `tern info` lists it: a Metal device with its registry id (which GPU of the Mac),
/// read through candle's Metal backend. That arm is compiled only with `--features metal`
/// (scripts/check_metal.sh type-checks it on Linux).
pub fn describe(d: &Device) -> String {
    match d {
        #[cfg(feature = "metal")]
        Device::Metal(m) => format!("metal (registry id {:#x})", m.metal_device().registry_id()),
        other => device_name(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("auto").is_ok());
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("expected one of"), "{e}");
        assert!(parse_device("cuda:x").is_err());
    }
}
