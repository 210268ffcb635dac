//! A TorchScript model opened for scoring and fine-tuning.
//!
//! This does what tch's `TrainableCModule::load` does — load the archive and hand its
//! parameters to training with gradients on — but keeps the parameters in a list with
//! their dotted names and registration order. `TrainableCModule` files them in a
//! `VarStore` under names with `.` replaced by `_`, which loses both the order (needed
//! to find the BatchNorm after a conv) and an unambiguous way back to the module path.
//! The tensors share storage with the module, so updating them updates what `save` writes.

use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;

use tch::{CModule, Device, Kind, Tensor};

use super::bundle::{BundleError, TensorDtype};
use super::data::SampleSet;
use super::error::{cause_line, EngineError};
use super::layers::{group_layers, LayerGroup};

pub struct NamedParam {
    pub name: String,
    pub tensor: Tensor,
}

/// Whether a libtorch error is the GPU runtime's or its libraries' (CUDA, cuDNN,
/// cuBLAS) rather than anything the model's code did.
fn is_device_failure(message: &str) -> bool {
    [
        "CUDA error",
        "CUDNN_STATUS_",
        "CUBLAS_STATUS_",
        "cuDNN error",
        "NCCL error",
    ]
    .iter()
    .any(|marker| message.contains(marker))
}

pub struct ScanModel {
    module: CModule,
    /// Whether images are fed laid out channels-last (see `channels_last_agrees`).
    channels_last: bool,
    /// Whether the module is in training mode (its own `self.training`), for errors.
    training: bool,
    pub params: Vec<NamedParam>,
    pub layers: Vec<LayerGroup>,
    pub num_classes: i64,
}

impl ScanModel {
    /// Loads the archive and checks it maps `sample` (a few clean images) to N×K logits.
    pub fn load(path: &Path, device: Device, sample: &Tensor) -> Result<Self, EngineError> {
        let mut module = CModule::load_on_device(path, device).map_err(|e| {
            let text = e.to_string();
            // A zip without TorchScript's constants: what `torch.save` writes (a
            // state_dict or a pickled module), the most common wrong file.
            let hint = if text.contains("constants.pkl") {
                " (this looks like a file written by torch.save: save the model as \
                 TorchScript, torch.jit.script(model).save(path) or torch.jit.trace)"
            } else {
                ""
            };
            EngineError::InvalidInput(format!(
                "model: not a loadable TorchScript archive: {}{hint}",
                cause_line(&text)
            ))
        })?;
        module.f_set_eval()?;
        let named = module.named_parameters()?;
        let mut params = Vec::with_capacity(named.len());
        for (name, tensor) in named {
            // The float kinds libtorch computes with everywhere a scan needs (finiteness
            // checks, gradients); float8 kinds count as floating point but have no such
            // kernels, and failed later as an internal error.
            // `f_kind`: a dtype newer than tch's `Kind` (uint16, float4) is an error
            // there, where `kind` would panic.
            let kind = tensor.f_kind().ok();
            if !matches!(
                kind,
                Some(Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
            ) {
                let dtype = kind.map_or_else(
                    || "of a dtype tch does not know".into(),
                    |k| format!("{k:?}"),
                );
                return Err(EngineError::InvalidInput(format!(
                    "model: parameter `{name}` is {dtype}; a scan needs float32, float64, \
                     float16 or bfloat16 parameters"
                )));
            }
            // Caught here, such a model would otherwise end with a divergence blamed on
            // the learning rate (non-finite values), or an internal error (no values
            // to group into neurons).
            if tensor.numel() == 0 {
                return Err(EngineError::InvalidInput(format!(
                    "model: parameter `{name}` has shape {:?}, which holds no values",
                    tensor.size()
                )));
            }
            if !all_finite(&tensor)? {
                return Err(EngineError::InvalidInput(format!(
                    "model: parameter `{name}` holds NaN or infinite values"
                )));
            }
            params.push(NamedParam {
                name,
                tensor: tensor.set_requires_grad(true),
            });
        }
        if params.is_empty() {
            return Err(EngineError::InvalidInput(
                "model: has no parameters to scan".into(),
            ));
        }
        let mut model = ScanModel {
            module,
            channels_last: false,
            training: false,
            params,
            layers: Vec::new(),
            num_classes: 0,
        };
        model.num_classes = model.probe(sample)?;
        // A split's last batch can hold a single image: a model that cannot take one
        // (a batch size written into its code, a `squeeze` that drops the batch axis)
        // would fail there, as an internal error, after minutes of work.
        let one = model.probe(&sample.narrow(0, 0, 1)).map_err(|e| {
            EngineError::InvalidInput(format!(
                "model: must accept any batch size, and fails on a batch of one image: {e}"
            ))
        })?;
        if one != model.num_classes {
            return Err(EngineError::InvalidInput(format!(
                "model: gives {one} logits for a batch of one image but {} for two",
                model.num_classes
            )));
        }
        model.channels_last = device == Device::Cpu && model.channels_last_agrees(sample);
        let shapes: Vec<(String, Vec<i64>)> = model
            .params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.size()))
            .collect();
        model.layers = group_layers(&shapes, model.num_classes);
        Ok(model)
    }

    /// Runs the model on `images` in eval mode and returns the number of classes it
    /// predicts. Anything other than N×K float logits is the user's model or data at fault.
    pub fn probe(&self, images: &Tensor) -> Result<i64, EngineError> {
        let n = images.size()[0];
        let rejected = |reason: String| {
            let dtype = if images.kind() == Kind::Uint8 {
                TensorDtype::U8
            } else {
                TensorDtype::F32
            };
            let shape = images.size().iter().map(|&d| d as usize).collect();
            EngineError::InvalidInput(
                BundleError::ModelRejectsImages {
                    shape,
                    dtype,
                    reason,
                }
                .to_string(),
            )
        };
        // With gradients on (the probe is two images): every defense differentiates the
        // logits, and libtorch crashed the process (SIGSEGV) differentiating a `forward`
        // that returned detached ones.
        let logits = self
            .module
            .forward_ts(&[images])
            .map_err(|e| rejected(cause_line(&e.to_string()).to_string()))?;
        let size = logits.size();
        if size.len() != 2 || size[0] != n || size[1] < 2 || !logits.is_floating_point() {
            return Err(rejected(format!(
                "expected {n}×K floating-point logits with K ≥ 2, got shape {size:?} of {:?}",
                logits.kind()
            )));
        }
        if !logits.requires_grad() {
            return Err(rejected(
                "its logits carry no gradient to its parameters (detached, or computed \
                 outside autograd); every defense needs that gradient"
                    .into(),
            ));
        }
        Ok(size[1])
    }

    /// Whether the model gives the same logits for `sample` laid out channels-last. On the
    /// CPU that layout is worth having: libtorch 2.13's max pooling over the default
    /// (NCHW) layout took 31% of a training step of the MNIST VGG (its channels-last
    /// kernel about a tenth of that), and convolutions and BatchNorm keep whichever
    /// layout they are given through the network. A model whose code assumes the default
    /// layout (a `view` of its input, say) fails or disagrees here, and is fed as before.
    fn channels_last_agrees(&self, sample: &Tensor) -> bool {
        if sample.dim() != 4 {
            return false;
        }
        tch::no_grad(|| {
            let (Ok(plain), Ok(relaid)) = (
                self.module.forward_ts(&[sample]),
                channels_last(sample).and_then(|images| Ok(self.module.forward_ts(&[images])?)),
            ) else {
                return false;
            };
            if plain.size() != relaid.size() {
                return false;
            }
            // Only summation order differs between the layouts' kernels.
            let close = || -> Result<bool, tch::TchError> {
                let scale = plain.f_abs()?.f_max()?.f_double_value(&[])?.max(1.0);
                let gap = plain
                    .f_sub(&relaid)?
                    .f_abs()?
                    .f_max()?
                    .f_double_value(&[])?;
                Ok(gap <= 1e-4 * scale)
            };
            close().unwrap_or(false)
        })
    }

    /// Whether `forward` and `activations` lay images out channels-last before calling
    /// the module.
    pub fn feeds_channels_last(&self) -> bool {
        self.channels_last
    }

    /// What the module is called with: `images` as they are, or laid out channels-last.
    fn feed(&self, images: &Tensor) -> Result<Tensor, EngineError> {
        if self.channels_last && images.dim() == 4 {
            channels_last(images)
        } else {
            Ok(images.shallow_clone())
        }
    }

    /// The first sample of `data` (counted from 0) whose logits are NaN or infinite, if
    /// any: a pass without gradients, in whatever mode the model is in.
    pub fn first_non_finite_logits(
        &self,
        data: &SampleSet,
        batch_size: usize,
    ) -> Result<Option<i64>, EngineError> {
        tch::no_grad(|| {
            let mut start = 0;
            for (images, _) in data.chunks(batch_size) {
                let logits = self.forward(&images)?;
                let bad_rows = logits.f_isfinite()?.f_all_dim(1, false)?.f_logical_not()?;
                if bad_rows.f_any()?.f_int64_value(&[])? != 0 {
                    let first = bad_rows.f_nonzero()?.f_int64_value(&[0, 0])?;
                    return Ok(Some(start + first));
                }
                start += images.size()[0];
            }
            Ok(None)
        })
    }

    /// `param`'s gradient, or zeros where the last backward pass did not reach it (a
    /// submodule `forward` never calls): that parameter does nothing for the loss.
    pub fn gradient_or_zeros(param: &Tensor) -> Tensor {
        defined_or_zeros(param.grad(), param)
    }

    /// The model's logits for `images`. An error raised while its `forward` runs is the
    /// uploaded code's, a client's to act on: the load-time probe ran it only in eval mode
    /// on two images and one, and a model may still refuse a larger batch or training
    /// mode (`if self.training: raise …`). Such an error names the batch and the mode.
    /// Out of memory stays recognisable by its message (see `server::child`); a failure
    /// of the GPU's runtime or libraries is not the model's, and stays internal.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor, EngineError> {
        self.module.forward_ts(&[self.feed(images)?]).map_err(|e| {
            let message = e.to_string();
            if is_device_failure(&message) {
                return EngineError::from(e);
            }
            EngineError::InvalidInput(format!(
                "model: its forward failed on a batch of {} images in {} mode: {}",
                images.size().first().copied().unwrap_or(0),
                if self.training { "training" } else { "eval" },
                cause_line(&message)
            ))
        })
    }

    /// Calls the model's exported `activations(x) -> Dict[str, Tensor]`: per hidden layer
    /// the mean post-nonlinearity output (N×C), keyed by the module path of the layer
    /// whose weight produces it (a [`LayerGroup`]'s name). `needed_by` names the method
    /// asking, for the error a model without that method gets.
    pub fn activations(
        &self,
        images: &Tensor,
        needed_by: &str,
    ) -> Result<Vec<(String, Tensor)>, EngineError> {
        let missing = |why: &str| {
            EngineError::InvalidInput(format!(
                "model: method `{needed_by}` needs the model to export \
                 `activations(x) -> Dict[str, Tensor]` (per hidden layer, the N×C mean \
                 activation keyed by the layer's module path, e.g. `features.0`; see \
                 scripts/make_models.py): {why}"
            ))
        };
        let fed = self.feed(images)?;
        let out = tch::no_grad(|| {
            self.module
                .method_is("activations", &[tch::IValue::Tensor(fed)])
        })
        .map_err(|e| missing(cause_line(&e.to_string())))?;
        let tch::IValue::GenericDict(entries) = out else {
            return Err(missing("it did not return a dict"));
        };
        let n = images.size()[0];
        let mut layers = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let (tch::IValue::String(name), tch::IValue::Tensor(t)) = (key, value) else {
                return Err(missing("its keys must be strings and its values tensors"));
            };
            let size = t.size();
            if size.len() != 2 || size[0] != n || !t.is_floating_point() {
                return Err(missing(&format!(
                    "entry `{name}` has shape {size:?} of {:?}, expected {n}×C floats",
                    t.kind()
                )));
            }
            // A NaN here would silently flatten the layer's ranking (its mean is NaN) and
            // leave its scores unreadable in the report.
            if !all_finite(&t)? {
                return Err(EngineError::InvalidInput(format!(
                    "model: its `activations` entry `{name}` holds NaN or infinite values"
                )));
            }
            layers.push((name, t));
        }
        Ok(layers)
    }

    pub fn set_train(&mut self) -> Result<(), EngineError> {
        self.module.f_set_train()?;
        self.training = true;
        Ok(())
    }

    pub fn set_eval(&mut self) -> Result<(), EngineError> {
        self.module.f_set_eval()?;
        self.training = false;
        Ok(())
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// Copies of every parameter, to try an edit and undo it.
    pub fn snapshot(&self) -> Vec<Tensor> {
        tch::no_grad(|| {
            self.params
                .iter()
                .map(|p| p.tensor.detach().copy())
                .collect()
        })
    }

    pub fn restore(&mut self, snapshot: &[Tensor]) -> Result<(), EngineError> {
        tch::no_grad(|| -> Result<(), EngineError> {
            for (p, saved) in self.params.iter_mut().zip(snapshot) {
                p.tensor.f_copy_(saved)?;
            }
            Ok(())
        })
    }

    pub fn parameter_count(&self) -> i64 {
        self.params.iter().map(|p| p.tensor.numel() as i64).sum()
    }

    /// The BatchNorm-like affine pair (γ, β) grouped into `layer`: its members that belong
    /// to another module than the layer's own (its own bias does not count).
    pub fn batchnorm(&self, layer: &LayerGroup) -> Option<(usize, usize)> {
        let module = |i: usize| {
            let name = &self.params[i].name;
            name.rsplit_once('.').map_or(name.as_str(), |(m, _)| m)
        };
        let foreign: Vec<usize> = layer
            .members
            .iter()
            .copied()
            .filter(|&m| module(m) != layer.name)
            .collect();
        let gamma = foreign
            .iter()
            .copied()
            .find(|&m| self.params[m].name.ends_with(".weight"))?;
        let beta = foreign
            .iter()
            .copied()
            .find(|&m| module(m) == module(gamma) && self.params[m].name.ends_with(".bias"))?;
        Some((gamma, beta))
    }

    /// The layer's own bias, if it has one.
    pub fn own_bias(&self, layer: &LayerGroup) -> Option<usize> {
        let bias = format!("{}.bias", layer.name);
        layer
            .members
            .iter()
            .copied()
            .find(|&m| self.params[m].name == bias)
    }

    /// The L2 norm of every neuron of `layer` (its weight row plus its bias/BN entries).
    pub fn neuron_norms(&self, layer: &LayerGroup) -> Result<Vec<f64>, EngineError> {
        let squared = self.neuron_sum(layer, |t| t.f_square())?;
        Ok(Vec::<f64>::try_from(
            squared
                .f_sqrt()?
                .f_to_kind(Kind::Double)?
                .f_to_device(tch::Device::Cpu)?,
        )?)
    }

    /// Σ over each neuron's entries of `f(param)` — f sees the parameter itself, so it
    /// can also read its gradient (gradient × weight) — as a `width`-long float vector.
    pub fn neuron_sum(
        &self,
        layer: &LayerGroup,
        f: impl Fn(&Tensor) -> Result<Tensor, tch::TchError>,
    ) -> Result<Tensor, EngineError> {
        tch::no_grad(|| {
            let width = layer.width as i64;
            let mut total = f(&self.params[layer.weight].tensor)?
                .f_reshape([width, -1])?
                .f_sum_dim_intlist(1, false, Kind::Float)?;
            for &m in &layer.members {
                total = total.f_add(&f(&self.params[m].tensor)?.f_to_kind(Kind::Float)?)?;
            }
            Ok(total)
        })
    }

    /// sha256 over every parameter's name, shape and float32 values, in order. Unlike
    /// the archive's own hash it is reproducible: `torch.jit.save` writes a random
    /// serialization id into every archive.
    pub fn parameters_sha256(&self) -> Result<String, EngineError> {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for p in &self.params {
            hasher.update(p.name.as_bytes());
            for d in p.tensor.size() {
                hasher.update(d.to_le_bytes());
            }
            let values = Vec::<f32>::try_from(
                p.tensor
                    .detach()
                    .f_to_device(tch::Device::Cpu)?
                    .f_to_kind(Kind::Float)?
                    .f_flatten(0, -1)?,
            )?;
            for v in values {
                hasher.update(v.to_le_bytes());
            }
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// Writes the model as TorchScript in eval mode, atomically: a temp file then rename,
    /// so a failure never leaves a half-written artifact where the caller expects one.
    pub fn save(&mut self, path: &Path) -> Result<(), EngineError> {
        self.set_eval()?;
        let tmp = path.with_extension("pt.partial");
        let saved = self
            .module
            .save(&tmp)
            .map_err(EngineError::from)
            .and_then(|()| {
                std::fs::rename(&tmp, path)
                    .map_err(|e| EngineError::Internal(format!("writing {}: {e}", path.display())))
            });
        if saved.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        saved
    }
}

/// A copy of N×C×H×W `images` with the channel varying fastest in memory (NHWC), the
/// same values at the same indices. Through `copy_`, so gradients flow back to `images`.
/// Built from explicit strides: `contiguous` in that format leaves a one-channel batch
/// as it is, since its layouts differ only in the stride of a size-1 dimension.
fn channels_last(images: &Tensor) -> Result<Tensor, EngineError> {
    let size = images.size();
    let [_, c, _, w] = size[..] else {
        return Ok(images.shallow_clone());
    };
    let h = size[2];
    let mut relaid = Tensor::f_empty_strided(
        &size,
        [c * h * w, 1, w * c, c],
        (images.kind(), images.device()),
    )?;
    relaid.f_copy_(images)?;
    Ok(relaid)
}

/// Whether every value of `t` is a finite number.
pub fn all_finite(t: &Tensor) -> Result<bool, EngineError> {
    Ok(t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0)
}

/// `grad` where autograd produced one, else zeros shaped like `like`: libtorch leaves a
/// gradient undefined for whatever the differentiated loss did not depend on.
pub fn defined_or_zeros(grad: Tensor, like: &Tensor) -> Tensor {
    if grad.defined() {
        grad
    } else {
        like.zeros_like()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models")
            .join(name)
    }

    #[test]
    fn channels_last_feeding_keeps_logits_and_input_gradients() {
        tch::manual_seed(3);
        for (name, channels, side) in [("mnist_cnn_bn.pt", 1, 28), ("shapes_vgg_bn.pt", 3, 32)] {
            let images = Tensor::rand([6, channels, side, side], (Kind::Float, Device::Cpu));
            let mut model =
                ScanModel::load(&fixture(name), Device::Cpu, &images.narrow(0, 0, 2)).unwrap();
            assert!(model.feeds_channels_last(), "{name}");
            let run = |model: &mut ScanModel| {
                let input = images.copy().set_requires_grad(true);
                let logits = model.forward(&input).unwrap();
                logits.sum(Kind::Float).backward();
                (logits.detach(), input.grad())
            };
            let (relaid_logits, relaid_grad) = run(&mut model);
            model.channels_last = false;
            let (plain_logits, plain_grad) = run(&mut model);
            let gap = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
            assert!(gap(&relaid_logits, &plain_logits) < 1e-4, "{name}");
            assert!(plain_grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
            assert!(gap(&relaid_grad, &plain_grad) < 1e-5, "{name}");
            // The one-channel batch really is relaid: its channel stride is 1.
            assert_eq!(channels_last(&images).unwrap().stride()[1], 1);
        }
    }
}
