//! Device names as the host spells them ("cpu", "cuda", "cuda:N") and conversions between candle
//! tensors and the ABI's plain f32 tensors.

use candle_core::{DType, Device, Tensor};
use kedit_plugin_api::Tensor as AbiTensor;

use crate::error::{invalid, unsupported, Result};

/// Opens the device named `name`.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim();
    match name {
        "" | "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => open_cuda(0),
        _ => match name.strip_prefix("cuda:") {
            Some(n) => open_cuda(n.parse::<usize>().map_err(|_| {
                invalid(format!(
                    "device '{name}': '{n}' is not a GPU number (use \"cpu\" or \"cuda:N\")"
                ))
            })?),
            None => Err(invalid(format!(
                "unknown device '{name}' (use \"cpu\" or \"cuda:N\")"
            ))),
        },
    }
}

fn open_cuda(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(unsupported(format!(
            "device 'cuda:{ordinal}': this plugin was built without the `cuda` feature; \
             rebuild it with `--features cuda` or use \"cpu\""
        )));
    }
    Device::new_cuda(ordinal)
        .map_err(|e| unsupported(format!("device 'cuda:{ordinal}' is not usable: {e}")))
}

/// The host's name for a device.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Copies a candle tensor (any shape, f32) into an ABI tensor.
pub fn to_abi(t: &Tensor) -> Result<AbiTensor> {
    let dims = t.dims().to_vec();
    let data = t
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    Ok(AbiTensor::new(&dims, data)?)
}

/// Copies an ABI tensor onto `device`, checking its shape when `expect` is given.
pub fn from_abi(
    t: &AbiTensor,
    device: &Device,
    what: &str,
    expect: Option<&[usize]>,
) -> Result<Tensor> {
    let dims = t.dims();
    if let Some(expect) = expect {
        t.expect_shape(what, expect)?;
    }
    let numel: usize = dims.iter().product();
    if numel != t.numel() {
        return Err(invalid(format!(
            "{what}: shape {dims:?} needs {numel} values but the buffer holds {}",
            t.numel()
        )));
    }
    if !t.is_finite() {
        return Err(invalid(format!(
            "{what}: the tensor holds NaN or infinite values"
        )));
    }
    Ok(Tensor::from_slice(t.as_slice(), dims, device)?)
}
