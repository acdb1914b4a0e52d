//! Tensors cross the ABI as a plain row-major f32 buffer with a shape. Copying an activation
//! costs microseconds while a forward pass costs tens of milliseconds, so the simplicity is free.

use abi_stable::{std_types::RVec, StableAbi};

use crate::error::PluginError;

/// A dense row-major f32 tensor.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Default)]
pub struct Tensor {
    pub shape: RVec<u64>,
    pub data: RVec<f32>,
}

impl Tensor {
    /// Builds a tensor, checking that the buffer length matches the shape.
    pub fn new(shape: &[usize], data: Vec<f32>) -> Result<Self, PluginError> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(PluginError::invalid(format!(
                "tensor shape {shape:?} needs {numel} values but {} were given",
                data.len()
            )));
        }
        Ok(Self {
            shape: shape.iter().map(|&d| d as u64).collect(),
            data: data.into(),
        })
    }

    pub fn zeros(shape: &[usize]) -> Self {
        let numel: usize = shape.iter().product();
        Self {
            shape: shape.iter().map(|&d| d as u64).collect(),
            data: vec![0.0; numel].into(),
        }
    }

    /// A 1-D tensor.
    pub fn vector(data: Vec<f32>) -> Self {
        Self {
            shape: vec![data.len() as u64].into(),
            data: data.into(),
        }
    }

    pub fn dims(&self) -> Vec<usize> {
        self.shape.iter().map(|&d| d as usize).collect()
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn as_slice(&self) -> &[f32] {
        self.data.as_slice()
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        self.data.as_mut_slice()
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.data.into_vec()
    }

    /// Row `i` of a 2-D tensor (or the `i`-th slice along the first axis of any tensor).
    pub fn row(&self, i: usize) -> &[f32] {
        let dims = self.dims();
        let stride: usize = dims[1..].iter().product();
        &self.data[i * stride..(i + 1) * stride]
    }

    /// Checks the shape, naming `what` in the error.
    pub fn expect_shape(&self, what: &str, shape: &[usize]) -> Result<(), PluginError> {
        if self.dims() != shape {
            return Err(PluginError::invalid(format!(
                "{what}: expected shape {shape:?}, got {:?}",
                self.dims()
            )));
        }
        Ok(())
    }

    /// Whether every value is finite.
    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }

    /// Frobenius norm, accumulated in f64.
    pub fn norm(&self) -> f64 {
        self.data
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum::<f64>()
            .sqrt()
    }
}
