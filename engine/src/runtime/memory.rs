//! How many bytes the KV pool gets, beside weights already loaded, from the memory that bounds
//! them: the host's (the worker's cgroup limit, or what the system has available) or a GPU's
//! (`limits.gpu_memory`, or what the device has free). A pure function of its inputs.

use pio_plugin_api::{ErrorKind, PluginError};

/// Host memory kept free beside the weights and the pool (activations, tokenizer, allocator slack).
pub(super) const HOST_HEADROOM: u64 = 256 << 20;

/// GPU memory kept free beside the weights and the pool: activations of a 256-token step of a
/// 4B model (logits alone are 256 × 151 936 × 4 bytes ≈ 156 MB), cuBLAS workspaces, the CUDA
/// context's own allocations and allocator slack.
pub(super) const DEVICE_HEADROOM: u64 = 1 << 30;

/// Of a GPU's free memory, what the engine takes when no cap is configured (vLLM's
/// `gpu_memory_utilization` default): the rest is left to other processes on the device.
const DEVICE_SHARE: f64 = 0.9;

/// Where the weights and the pool live and what bounds them there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Memory {
    /// Host memory: the worker's limit, and what the system reports available.
    Host {
        /// The worker's memory limit (its cgroup's).
        limit: Option<u64>,
        /// `MemAvailable` at load.
        available: Option<u64>,
    },
    /// A GPU's memory: the configured cap, and what the device has free with the weights loaded.
    Device {
        /// `limits.gpu_memory`.
        limit: Option<u64>,
        /// Free device memory after loading the weights.
        free: Option<u64>,
    },
}

impl Memory {
    /// The memory that bounds a model on `device`: the host's with the worker's `host_limit`, or
    /// the GPU's with its `gpu_limit` and what it has free now (call it with the weights loaded).
    pub(super) fn measure(
        device: &candle_core::Device,
        host_limit: Option<u64>,
        gpu_limit: Option<u64>,
    ) -> Self {
        if device.is_cpu() {
            Self::Host {
                limit: host_limit,
                available: available_memory(),
            }
        } else {
            Self::Device {
                limit: gpu_limit,
                free: device_free(device),
            }
        }
    }

    /// The cap reported beside the device memory in use: the GPU's configured one.
    pub(super) fn device_limit(self) -> Option<u64> {
        match self {
            Self::Device { limit, .. } => limit,
            Self::Host { .. } => None,
        }
    }
}

/// Bytes the operating system reports available now (`MemAvailable`), if it says.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Free bytes of a GPU's memory now, if the device says.
fn device_free(device: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(gpu) = device {
        let (free, _total) = gpu.cuda_stream().context().mem_get_info().ok()?;
        return Some(free as u64);
    }
    let _ = device;
    None
}

/// The pool's bytes given `weights` bytes already resident and an explicit `requested` size
/// (`kv_cache_bytes`), or the error that says what does not fit and what to change.
pub(super) fn pool_bytes(
    memory: Memory,
    weights: u64,
    requested: Option<u64>,
) -> Result<u64, PluginError> {
    match (memory, requested) {
        // The host's limit is the cgroup's to enforce: an explicit size is taken as given.
        (Memory::Host { .. }, Some(requested)) => Ok(requested),
        (
            Memory::Host {
                limit: Some(limit),
                available,
            },
            None,
        ) => {
            let left = limit.saturating_sub(weights + HOST_HEADROOM);
            if left == 0 {
                return Err(PluginError::invalid_config(format!(
                    "the memory limit ({limit} bytes) leaves nothing for the KV cache beside the model's weights ({weights} bytes): raise limits.memory or quantize the model"
                )));
            }
            // A limit above what the machine has (a manifest's 72 GiB on a 32 GB host) is no
            // measure of room: the pool's pages come as it fills, and the kernel's OOM killer
            // ended the worker mid-serving. Half of what is available, as with no limit.
            Ok(available.map_or(left, |a| left.min(a / 2)))
        }
        (
            Memory::Host {
                limit: None,
                available,
            },
            None,
        ) => Ok(available.map_or(1 << 30, |a| a / 2)),
        (Memory::Device { limit, free }, _) => device_pool_bytes(limit, free, weights, requested),
    }
}

/// Before loading: whether weights of at least `at_least` bytes can fit `memory` (measured with
/// nothing loaded) beside the activation headroom. Only a GPU is checked here: the host's limit
/// is the cgroup's.
pub(super) fn weights_fit(memory: Memory, at_least: u64) -> Result<(), PluginError> {
    let Memory::Device { limit, free } = memory else {
        return Ok(());
    };
    let free = free.map(|f| ((f as f64 * DEVICE_SHARE) as u64, "the device's free memory"));
    let allowed = match (limit.map(|l| (l, "limits.gpu_memory")), free) {
        (Some(l), Some(f)) => Some(if f.0 < l.0 { f } else { l }),
        (l, f) => l.or(f),
    };
    match allowed {
        Some((allowed, source)) if at_least + DEVICE_HEADROOM > allowed => Err(PluginError::new(
            ErrorKind::OUT_OF_MEMORY,
            format!(
                "the model does not fit in GPU memory: its weights alone take at least {at_least} bytes (from the files' headers), and {DEVICE_HEADROOM} bytes go to activations, {} in all; {source} allows {allowed}. Raise limits.gpu_memory, or quantize the model (quantization = \"q8\" or \"q4\")",
                at_least + DEVICE_HEADROOM
            ),
        )),
        _ => Ok(()),
    }
}

/// [`pool_bytes`] on a GPU, where nothing else enforces the cap: everything must fit inside it.
fn device_pool_bytes(
    limit: Option<u64>,
    free: Option<u64>,
    weights: u64,
    requested: Option<u64>,
) -> Result<u64, PluginError> {
    // What the device can still give us counts the weights it already holds.
    let reachable = free.map(|f| weights + (f as f64 * DEVICE_SHARE) as u64);
    let (allowed, source) = match (limit, reachable) {
        (Some(l), Some(r)) if r < l => (r, "the device's free memory"),
        (Some(l), _) => (l, "limits.gpu_memory"),
        (None, Some(r)) => (r, "the device's free memory"),
        (None, None) => {
            return requested.ok_or_else(|| {
                PluginError::invalid_config(
                    "the GPU's free memory is unknown and no size was given: set limits.gpu_memory, or [model.options] kv_cache_bytes",
                )
            })
        }
    };
    let base = weights + DEVICE_HEADROOM;
    let needed = base + requested.unwrap_or(0);
    if needed > allowed || base >= allowed {
        let what = match requested {
            Some(kv) => format!("the weights ({weights} bytes), the KV cache asked for ({kv} bytes, kv_cache_bytes) and {DEVICE_HEADROOM} bytes for activations"),
            None => format!("the weights ({weights} bytes), {DEVICE_HEADROOM} bytes for activations and room for a KV cache"),
        };
        return Err(PluginError::new(
            ErrorKind::OUT_OF_MEMORY,
            format!(
                "the model does not fit in GPU memory: it needs {needed} bytes for {what}; {source} allows {allowed}. Raise limits.gpu_memory, quantize the model (quantization = \"q8\" or \"q4\"), or lower kv_cache_bytes"
            ),
        ));
    }
    Ok(requested.unwrap_or(allowed - base))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    #[test]
    fn the_host_pool_takes_what_the_limit_leaves() {
        let host = |limit| Memory::Host {
            limit,
            available: Some(8 * G),
        };
        assert_eq!(pool_bytes(host(None), G, None).unwrap(), 4 * G);
        assert_eq!(pool_bytes(host(None), G, Some(7)).unwrap(), 7);
        assert_eq!(
            pool_bytes(host(Some(3 * G)), G, None).unwrap(),
            2 * G - HOST_HEADROOM
        );
        // A limit past what the machine has: half the available memory, as with none.
        assert_eq!(pool_bytes(host(Some(72 * G)), 17 * G, None).unwrap(), 4 * G);
        let e = pool_bytes(host(Some(G)), G, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::INVALID_CONFIG);
        assert!(e.message.contains("limits.memory"), "{e}");
    }

    #[test]
    fn a_gpu_pool_fits_inside_the_cap_with_the_weights() {
        let gpu = |limit, free| Memory::Device { limit, free };
        // 12 GiB cap, 8 GiB of weights, a device with plenty free: the cap decides.
        assert_eq!(
            pool_bytes(gpu(Some(12 * G), Some(100 * G)), 8 * G, None).unwrap(),
            3 * G
        );
        // The device has less free than the cap allows: its free memory decides.
        let free = 4 * G;
        let got = pool_bytes(gpu(Some(40 * G), Some(free)), 8 * G, None).unwrap();
        assert_eq!(got, (free as f64 * DEVICE_SHARE) as u64 - DEVICE_HEADROOM);
        // No cap: a share of the free memory.
        assert!(pool_bytes(gpu(None, Some(10 * G)), G, None).unwrap() < 9 * G);
        // An explicit size inside the cap is taken as given.
        assert_eq!(
            pool_bytes(gpu(Some(12 * G), None), 8 * G, Some(2 * G)).unwrap(),
            2 * G
        );
    }

    #[test]
    fn a_model_over_the_gpu_cap_is_refused_with_the_numbers() {
        let gpu = Memory::Device {
            limit: Some(8 * G),
            free: Some(100 * G),
        };
        let e = pool_bytes(gpu, 8 * G, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::OUT_OF_MEMORY);
        let needed = (8 * G + DEVICE_HEADROOM).to_string();
        assert!(
            e.message.contains(&needed) && e.message.contains(&(8 * G).to_string()),
            "needed and allowed: {e}"
        );
        assert!(e.message.contains("limits.gpu_memory"), "{e}");
        // Weights that fit, a KV cache asked for that does not.
        let e = pool_bytes(gpu, 4 * G, Some(4 * G)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::OUT_OF_MEMORY);
        assert!(e.message.contains("kv_cache_bytes"), "{e}");
        // Before loading: a lower bound over the cap refuses at once, naming both.
        let e = weights_fit(gpu, 8 * G).unwrap_err();
        assert_eq!(e.kind, ErrorKind::OUT_OF_MEMORY);
        assert!(e.message.contains(&(8 * G).to_string()), "{e}");
        assert!(weights_fit(gpu, 6 * G).is_ok());
        let host = Memory::Host {
            limit: Some(1),
            available: None,
        };
        assert!(
            weights_fit(host, 8 * G).is_ok(),
            "the host's limit is the cgroup's"
        );
        // Neither a cap nor a free-memory figure: only an explicit size will do.
        let unknown = Memory::Device {
            limit: None,
            free: None,
        };
        assert!(pool_bytes(unknown, G, None).is_err());
        assert_eq!(pool_bytes(unknown, G, Some(5)).unwrap(), 5);
    }
}
