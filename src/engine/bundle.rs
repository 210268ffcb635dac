//! Clean-sample bundles: `.safetensors` or `.npz` files holding `images` (N,C,H,W; uint8
//! or float32) and `labels` (N; int64). A poison bundle may also hold `targets` (N; int64),
//! each sample's attack target, for attacks whose target depends on the sample
//! (all-to-all); without it, one target label applies to every sample.
//!
//! Parsing and validation are plain Rust with no libtorch, so every way a hostile or
//! careless upload can be wrong is caught here with a one-line message, before any
//! tensor is built. Checks that need the model (label range, image shape) live in the
//! engine, which reports them through the same [`BundleError`].

use std::fmt;
use std::io::Read;
use std::path::Path;

use safetensors::SafeTensors;

use super::npy::parse_npy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorDtype {
    U8,
    F32,
    I64,
}

impl TensorDtype {
    pub fn size(self) -> usize {
        match self {
            TensorDtype::U8 => 1,
            TensorDtype::F32 => 4,
            TensorDtype::I64 => 8,
        }
    }
}

impl fmt::Display for TensorDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TensorDtype::U8 => "uint8",
            TensorDtype::F32 => "float32",
            TensorDtype::I64 => "int64",
        })
    }
}

/// Everything that can be wrong with a bundle. Each variant is a client mistake.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BundleError {
    #[error("cannot read bundle: {0}")]
    Unreadable(String),
    /// An allocation for the bundle's arrays was refused (a job's memory limit).
    #[error("not enough memory to read {0}")]
    OutOfMemory(String),
    #[error("not a .safetensors or .npz file: {0}")]
    UnknownFormat(String),
    #[error("malformed bundle: {0}")]
    Malformed(String),
    #[error("bundle has no `{missing}` tensor (found: {found})")]
    MissingTensor {
        missing: &'static str,
        found: String,
    },
    #[error("`{tensor}` has dtype {found}; expected {expected}", expected = expected_dtype(tensor))]
    WrongDtype { tensor: String, found: String },
    #[error("`images` must be 4-D (N, C, H, W); got shape {0:?}")]
    ImagesNotFourDimensional(Vec<usize>),
    #[error("`labels` must be 1-D (N); got shape {0:?}")]
    LabelsNotOneDimensional(Vec<usize>),
    #[error("`targets` must be 1-D (N); got shape {0:?}")]
    TargetsNotOneDimensional(Vec<usize>),
    #[error("`images` holds {images} samples but `targets` holds {targets}")]
    TargetCountMismatch { images: usize, targets: usize },
    #[error("`targets` contains {target} at index {index}; targets must lie in 0..{num_classes}")]
    TargetOutOfRange {
        target: i64,
        index: usize,
        num_classes: i64,
    },
    #[error("`targets` contains {target} at index {index}; class indices are 0 or more")]
    NegativeTarget { target: i64, index: usize },
    #[error("`labels` contains {label} at index {index}; class indices are 0 or more")]
    NegativeLabel { label: i64, index: usize },
    #[error("`images` holds {images} samples but `labels` holds {labels}")]
    CountMismatch { images: usize, labels: usize },
    #[error("bundle is empty: it holds no samples")]
    Empty,
    #[error("`images` has a zero-sized dimension: shape {0:?}")]
    ZeroSizedImage(Vec<usize>),
    #[error("`images` contains {count} NaN or infinite values (first at flat index {first})")]
    NonFinite { count: usize, first: usize },
    #[error("`labels` contains {label} at index {index}; labels must lie in 0..{num_classes}")]
    LabelOutOfRange {
        label: i64,
        index: usize,
        num_classes: i64,
    },
    #[error("the model rejects these images (shape {shape:?}, dtype {dtype}): {reason}")]
    ModelRejectsImages {
        shape: Vec<usize>,
        dtype: TensorDtype,
        reason: String,
    },
}

fn expected_dtype(tensor: &str) -> &'static str {
    if tensor == "labels" || tensor == "targets" {
        "int64"
    } else {
        "uint8 or float32"
    }
}

/// One array as read from disk, before it is checked for its role in the bundle.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub dtype: TensorDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn new(
        name: &str,
        dtype: TensorDtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    ) -> Result<Self, BundleError> {
        let expected = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                BundleError::Malformed(format!("array `{name}`: shape {shape:?} overflows"))
            })?;
        if data.len() != expected {
            return Err(BundleError::Malformed(format!(
                "array `{name}`: shape {shape:?} of {dtype} needs {expected} bytes, file holds {}",
                data.len()
            )));
        }
        Ok(RawTensor { dtype, shape, data })
    }
}

/// Image pixels in the dtype the user sent; the model decides how to normalise them.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

/// A validated bundle: `images` is N×C×H×W, `labels` has N non-negative entries.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    pub pixels: Pixels,
    /// N, C, H, W.
    pub shape: [usize; 4],
    pub labels: Vec<i64>,
    /// Each sample's attack target, when it depends on the sample (all-to-all poison sets).
    pub targets: Option<Vec<i64>>,
}

impl Bundle {
    pub fn len(&self) -> usize {
        self.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }

    pub fn dtype(&self) -> TensorDtype {
        match self.pixels {
            Pixels::U8(_) => TensorDtype::U8,
            Pixels::F32(_) => TensorDtype::F32,
        }
    }

    /// Checks that every label names one of the model's `num_classes` outputs.
    pub fn check_labels_below(&self, num_classes: i64) -> Result<(), BundleError> {
        match self.labels.iter().position(|&l| l >= num_classes) {
            Some(index) => Err(BundleError::LabelOutOfRange {
                label: self.labels[index],
                index,
                num_classes,
            }),
            None => Ok(()),
        }?;
        let targets = self.targets.as_deref().unwrap_or(&[]);
        match targets.iter().position(|&t| t >= num_classes) {
            Some(index) => Err(BundleError::TargetOutOfRange {
                target: targets[index],
                index,
                num_classes,
            }),
            None => Ok(()),
        }
    }

    /// Attaches per-sample attack targets, validated like labels.
    pub fn with_targets(mut self, targets: RawTensor) -> Result<Self, BundleError> {
        if targets.dtype != TensorDtype::I64 {
            return Err(BundleError::WrongDtype {
                tensor: "targets".into(),
                found: targets.dtype.to_string(),
            });
        }
        if targets.shape.len() != 1 {
            return Err(BundleError::TargetsNotOneDimensional(targets.shape));
        }
        if targets.shape[0] != self.len() {
            return Err(BundleError::TargetCountMismatch {
                images: self.len(),
                targets: targets.shape[0],
            });
        }
        let values = le_i64s(&targets.data);
        if let Some(index) = values.iter().position(|&t| t < 0) {
            return Err(BundleError::NegativeTarget {
                target: values[index],
                index,
            });
        }
        self.targets = Some(values);
        Ok(self)
    }

    /// Builds a bundle from in-memory parts, validating exactly as a file would be.
    pub fn from_parts(images: RawTensor, labels: RawTensor) -> Result<Self, BundleError> {
        if images.dtype == TensorDtype::I64 {
            return Err(BundleError::WrongDtype {
                tensor: "images".into(),
                found: images.dtype.to_string(),
            });
        }
        if labels.dtype != TensorDtype::I64 {
            return Err(BundleError::WrongDtype {
                tensor: "labels".into(),
                found: labels.dtype.to_string(),
            });
        }
        let shape: [usize; 4] = images
            .shape
            .as_slice()
            .try_into()
            .map_err(|_| BundleError::ImagesNotFourDimensional(images.shape.clone()))?;
        if labels.shape.len() != 1 {
            return Err(BundleError::LabelsNotOneDimensional(labels.shape));
        }
        if shape[0] != labels.shape[0] {
            return Err(BundleError::CountMismatch {
                images: shape[0],
                labels: labels.shape[0],
            });
        }
        if shape[0] == 0 {
            return Err(BundleError::Empty);
        }
        if shape[1..].contains(&0) {
            return Err(BundleError::ZeroSizedImage(shape.to_vec()));
        }
        let label_values = le_i64s(&labels.data);
        if let Some(index) = label_values.iter().position(|&l| l < 0) {
            return Err(BundleError::NegativeLabel {
                label: label_values[index],
                index,
            });
        }
        let pixels = match images.dtype {
            TensorDtype::U8 => Pixels::U8(images.data),
            TensorDtype::F32 => {
                let values: Vec<f32> = images
                    .data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("chunks of 4")))
                    .collect();
                let mut non_finite = values.iter().enumerate().filter(|(_, v)| !v.is_finite());
                if let Some((first, _)) = non_finite.next() {
                    return Err(BundleError::NonFinite {
                        count: 1 + non_finite.count(),
                        first,
                    });
                }
                Pixels::F32(values)
            }
            TensorDtype::I64 => unreachable!("rejected above"),
        };
        Ok(Bundle {
            pixels,
            shape,
            labels: label_values,
            targets: None,
        })
    }

    /// The samples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Bundle {
        let per_sample = self.shape[1] * self.shape[2] * self.shape[3];
        let pixels = match &self.pixels {
            Pixels::U8(v) => Pixels::U8(
                indices
                    .iter()
                    .flat_map(|&i| v[i * per_sample..(i + 1) * per_sample].iter().copied())
                    .collect(),
            ),
            Pixels::F32(v) => Pixels::F32(
                indices
                    .iter()
                    .flat_map(|&i| v[i * per_sample..(i + 1) * per_sample].iter().copied())
                    .collect(),
            ),
        };
        let [_, c, h, w] = self.shape;
        Bundle {
            pixels,
            shape: [indices.len(), c, h, w],
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            targets: self
                .targets
                .as_ref()
                .map(|t| indices.iter().map(|&i| t[i]).collect()),
        }
    }

    /// Samples `range`, as a new bundle.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Bundle {
        self.select(&range.collect::<Vec<_>>())
    }

    /// Encodes the bundle as `.safetensors` bytes (used by the lab to write bundles).
    pub fn to_safetensors(&self) -> Vec<u8> {
        use safetensors::tensor::{Dtype, TensorView};
        let (dtype, image_bytes): (Dtype, Vec<u8>) = match &self.pixels {
            Pixels::U8(v) => (Dtype::U8, v.clone()),
            Pixels::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        let label_bytes: Vec<u8> = self.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        let images =
            TensorView::new(dtype, self.shape.to_vec(), &image_bytes).expect("shape matches data");
        let labels = TensorView::new(Dtype::I64, vec![self.labels.len()], &label_bytes)
            .expect("shape matches data");
        let mut views = vec![("images", images), ("labels", labels)];
        let target_bytes: Vec<u8> = self
            .targets
            .iter()
            .flatten()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        if let Some(targets) = &self.targets {
            let view = TensorView::new(Dtype::I64, vec![targets.len()], &target_bytes)
                .expect("shape matches data");
            views.push(("targets", view));
        }
        safetensors::serialize(views, None).expect("in-memory serialisation")
    }
}

fn le_i64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("chunks of 8")))
        .collect()
}

/// Reads and validates a bundle file, telling the format from its first bytes.
pub fn load_bundle(path: &Path) -> Result<Bundle, BundleError> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::OutOfMemory => BundleError::OutOfMemory(path.display().to_string()),
        _ => BundleError::Unreadable(format!("{}: {e}", path.display())),
    })?;
    parse_bundle_owned(bytes)
}

/// Parses and validates bundle bytes (`.safetensors` or `.npz`) the caller keeps: they
/// are copied once, and the copy read as [`parse_bundle_owned`] reads its bytes.
pub fn parse_bundle(bytes: &[u8]) -> Result<Bundle, BundleError> {
    parse_bundle_owned(bytes.to_vec())
}

/// Parses and validates bundle bytes (`.safetensors` or `.npz`), telling the format from
/// the first bytes. A `.safetensors` file's images stay in its buffer (the rest of the
/// file is cut away in place) instead of being copied out of it, and an `.npz` archive
/// is dropped once its arrays are inflated, so a large bundle's pixels are not held
/// twice while it is read.
pub fn parse_bundle_owned(bytes: Vec<u8>) -> Result<Bundle, BundleError> {
    let parsed = if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        let parsed = read_npz(&bytes)?;
        drop(bytes);
        parsed
    } else if looks_like_safetensors(&bytes) {
        read_safetensors(bytes)?
    } else {
        return Err(BundleError::UnknownFormat(
            "expected a safetensors header or a zip (.npz) archive".into(),
        ));
    };
    assemble(parsed)
}

/// The bundle from its arrays, checked.
fn assemble(parsed: Parsed) -> Result<Bundle, BundleError> {
    let (mut images, mut labels, targets, names) = parsed;
    // Named in the error; a model archive given as a bundle holds dozens of entries.
    const SHOWN: usize = 8;
    let found = match names.len() {
        0 => "nothing".to_string(),
        n if n <= SHOWN => names.join(", "),
        n => format!("{}, and {} more", names[..SHOWN].join(", "), n - SHOWN),
    };
    let images = images.take().ok_or(BundleError::MissingTensor {
        missing: "images",
        found: found.clone(),
    })?;
    let labels = labels.take().ok_or(BundleError::MissingTensor {
        missing: "labels",
        found,
    })?;
    let bundle = Bundle::from_parts(images, labels)?;
    match targets {
        Some(targets) => bundle.with_targets(targets),
        None => Ok(bundle),
    }
}

/// `images`, `labels` and `targets` when present, and every array name found.
type Parsed = (
    Option<RawTensor>,
    Option<RawTensor>,
    Option<RawTensor>,
    Vec<String>,
);

fn looks_like_safetensors(bytes: &[u8]) -> bool {
    bytes.len() >= 9 && bytes[8] == b'{'
}

/// The arrays of a `.safetensors` file, the images kept in `bytes` itself: labels and
/// targets are small and copied out, then everything around the images is cut away in
/// place.
fn read_safetensors(mut bytes: Vec<u8>) -> Result<Parsed, BundleError> {
    let (images_at, labels, targets, names) = {
        let st =
            SafeTensors::deserialize(&bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
        // Where the images lie in the buffer (the view borrows it; the offset does not).
        let images_at = safetensors_view(&st, "images")?.map(|(dtype, shape, data)| {
            let start = data.as_ptr() as usize - bytes.as_ptr() as usize;
            (dtype, shape, start..start + data.len())
        });
        (
            images_at,
            copied(&st, "labels")?,
            copied(&st, "targets")?,
            sorted_names(&st),
        )
    };
    let images = match images_at {
        Some((dtype, shape, range)) => {
            bytes.truncate(range.end);
            bytes.drain(..range.start);
            Some(RawTensor::new("images", dtype, shape, bytes)?)
        }
        None => None,
    };
    Ok((images, labels, targets, names))
}

/// A tensor's dtype, shape and bytes (borrowed from the file).
type TensorView<'a> = (TensorDtype, Vec<usize>, &'a [u8]);

/// The tensor called `name`, `None` when the file has none.
fn safetensors_view<'a>(
    st: &SafeTensors<'a>,
    name: &str,
) -> Result<Option<TensorView<'a>>, BundleError> {
    use safetensors::tensor::Dtype;
    let Ok(view) = st.tensor(name) else {
        return Ok(None);
    };
    let dtype = match view.dtype() {
        Dtype::U8 => TensorDtype::U8,
        Dtype::F32 => TensorDtype::F32,
        Dtype::I64 => TensorDtype::I64,
        other => {
            return Err(BundleError::WrongDtype {
                tensor: name.to_string(),
                found: format!("{other:?}").to_lowercase(),
            })
        }
    };
    Ok(Some((dtype, view.shape().to_vec(), view.data())))
}

/// A (small) tensor copied out of the file.
fn copied(st: &SafeTensors, name: &str) -> Result<Option<RawTensor>, BundleError> {
    safetensors_view(st, name)?
        .map(|(dtype, shape, data)| RawTensor::new(name, dtype, shape, data.to_vec()))
        .transpose()
}

fn sorted_names(st: &SafeTensors) -> Vec<String> {
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
}

/// Largest uncompressed total of the arrays we read from one `.npz`, so a zip bomb (a
/// small upload that inflates without bound) cannot exhaust memory.
const MAX_NPZ_BYTES: u64 = 8 << 30;

/// Most memory reserved up front for one entry: its declared size can lie.
const NPZ_RESERVE_BYTES: u64 = 64 << 20;

fn read_npz(bytes: &[u8]) -> Result<Parsed, BundleError> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| BundleError::Malformed(format!("npz: {e}")))?;
    let mut names: Vec<String> = archive
        .file_names()
        .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string())
        .collect();
    names.sort();
    let mut left = MAX_NPZ_BYTES;
    let mut take = |name: &str| -> Result<Option<RawTensor>, BundleError> {
        // Only a missing entry is "no such array"; one that is there but cannot be read
        // (a compression this reader lacks, encryption, a damaged header) says why.
        let entry = match archive.by_name(&format!("{name}.npy")) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => {
                return Err(BundleError::Malformed(format!(
                    "npz entry `{name}.npy` cannot be read: {e}"
                )))
            }
        };
        let too_large = || {
            BundleError::Malformed(format!(
                "npz arrays exceed {MAX_NPZ_BYTES} bytes uncompressed (at `{name}`)"
            ))
        };
        let declared = entry.size();
        if declared > left {
            return Err(too_large());
        }
        let mut data = Vec::with_capacity(declared.min(NPZ_RESERVE_BYTES) as usize);
        entry
            .take(left + 1)
            .read_to_end(&mut data)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::OutOfMemory => {
                    BundleError::OutOfMemory(format!("npz entry `{name}`"))
                }
                _ => BundleError::Malformed(format!("npz entry `{name}`: {e}")),
            })?;
        if data.len() as u64 > left {
            return Err(too_large());
        }
        left -= data.len() as u64;
        parse_npy(name, data).map(Some)
    };
    Ok((take("images")?, take("labels")?, take("targets")?, names))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images_u8(shape: Vec<usize>) -> RawTensor {
        let n = shape.iter().product();
        RawTensor::new("images", TensorDtype::U8, shape, vec![7; n]).unwrap()
    }

    fn labels(values: &[i64]) -> RawTensor {
        RawTensor::new(
            "labels",
            TensorDtype::I64,
            vec![values.len()],
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
        .unwrap()
    }

    #[test]
    fn accepts_a_valid_bundle_and_round_trips_through_safetensors() {
        let bundle = Bundle::from_parts(images_u8(vec![2, 1, 2, 2]), labels(&[3, 4])).unwrap();
        let again = parse_bundle(&bundle.to_safetensors()).unwrap();
        assert_eq!(again.shape, [2, 1, 2, 2]);
        assert_eq!(again.labels, vec![3, 4]);
        assert_eq!(again.pixels, Pixels::U8(vec![7; 8]));
    }

    #[test]
    fn rejects_wrong_rank() {
        let err = Bundle::from_parts(images_u8(vec![2, 4]), labels(&[0, 1])).unwrap_err();
        assert_eq!(err, BundleError::ImagesNotFourDimensional(vec![2, 4]));
        let label_matrix =
            RawTensor::new("labels", TensorDtype::I64, vec![1, 2], vec![0; 16]).unwrap();
        let err = Bundle::from_parts(images_u8(vec![1, 1, 1, 1]), label_matrix).unwrap_err();
        assert_eq!(err, BundleError::LabelsNotOneDimensional(vec![1, 2]));
    }

    #[test]
    fn rejects_count_mismatch_and_empty() {
        let err = Bundle::from_parts(images_u8(vec![3, 1, 2, 2]), labels(&[0, 1])).unwrap_err();
        assert_eq!(
            err,
            BundleError::CountMismatch {
                images: 3,
                labels: 2
            }
        );
        let err = Bundle::from_parts(images_u8(vec![0, 1, 2, 2]), labels(&[])).unwrap_err();
        assert_eq!(err, BundleError::Empty);
    }

    #[test]
    fn rejects_wrong_dtypes() {
        let float_labels = RawTensor::new("labels", TensorDtype::F32, vec![1], vec![0; 4]).unwrap();
        let err = Bundle::from_parts(images_u8(vec![1, 1, 1, 1]), float_labels).unwrap_err();
        assert!(err.to_string().contains("expected int64"), "{err}");
        let int_images =
            RawTensor::new("images", TensorDtype::I64, vec![1, 1, 1, 1], vec![0; 8]).unwrap();
        let err = Bundle::from_parts(int_images, labels(&[0])).unwrap_err();
        assert!(err.to_string().contains("uint8 or float32"), "{err}");
    }

    #[test]
    fn rejects_non_finite_pixels() {
        let values = [0.5f32, f32::NAN, f32::INFINITY, 1.0];
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let images = RawTensor::new("images", TensorDtype::F32, vec![1, 1, 2, 2], data).unwrap();
        let err = Bundle::from_parts(images, labels(&[0])).unwrap_err();
        assert_eq!(err, BundleError::NonFinite { count: 2, first: 1 });
    }

    #[test]
    fn rejects_negative_and_too_large_labels() {
        let err = Bundle::from_parts(images_u8(vec![2, 1, 1, 1]), labels(&[0, -1])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`labels` contains -1 at index 1; class indices are 0 or more"
        );
        let bundle = Bundle::from_parts(images_u8(vec![2, 1, 1, 1]), labels(&[0, 10])).unwrap();
        let err = bundle.check_labels_below(10).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`labels` contains 10 at index 1; labels must lie in 0..10"
        );
    }

    #[test]
    fn names_what_is_missing_and_what_was_found() {
        use safetensors::tensor::{Dtype, TensorView};
        let data = [0u8; 4];
        let only_pixels = TensorView::new(Dtype::U8, vec![1, 1, 2, 2], &data).unwrap();
        let bytes = safetensors::serialize([("pixels", only_pixels)], None).unwrap();
        let err = parse_bundle(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "bundle has no `images` tensor (found: pixels)"
        );
    }

    #[test]
    fn rejects_unknown_formats_and_truncation() {
        assert!(matches!(
            parse_bundle(b"just some text"),
            Err(BundleError::UnknownFormat(_))
        ));
        let bundle = Bundle::from_parts(images_u8(vec![2, 1, 2, 2]), labels(&[3, 4])).unwrap();
        let bytes = bundle.to_safetensors();
        assert!(matches!(
            parse_bundle(&bytes[..bytes.len() - 3]),
            Err(BundleError::Malformed(_))
        ));
    }

    #[test]
    fn targets_round_trip_through_safetensors_and_follow_selection() {
        let bundle = Bundle::from_parts(images_u8(vec![3, 1, 2, 2]), labels(&[0, 1, 2]))
            .unwrap()
            .with_targets(labels(&[1, 2, 0]))
            .unwrap();
        let again = parse_bundle(&bundle.to_safetensors()).unwrap();
        assert_eq!(again.targets, Some(vec![1, 2, 0]));
        assert_eq!(again.select(&[2, 0]).targets, Some(vec![0, 1]));
        let plain = Bundle::from_parts(images_u8(vec![1, 1, 1, 1]), labels(&[0])).unwrap();
        assert_eq!(parse_bundle(&plain.to_safetensors()).unwrap().targets, None);
    }

    #[test]
    fn an_owned_safetensors_file_keeps_its_images_in_its_own_buffer() {
        let pixels: Vec<u8> = (0..96).map(|v| (v * 7 % 256) as u8).collect();
        let images = RawTensor::new("images", TensorDtype::U8, vec![3, 2, 4, 4], pixels.clone());
        let bundle = Bundle::from_parts(images.unwrap(), labels(&[0, 1, 2]))
            .unwrap()
            .with_targets(labels(&[1, 2, 0]))
            .unwrap();
        let file = bundle.to_safetensors();
        let buffer = file.as_ptr();
        let owned = parse_bundle_owned(file).unwrap();
        assert_eq!(owned, bundle);
        let Pixels::U8(kept) = &owned.pixels else {
            panic!("uint8 images came back as {:?}", owned.pixels)
        };
        assert_eq!(kept, &pixels);
        assert_eq!(
            kept.as_ptr(),
            buffer,
            "the pixels were copied out of the file"
        );

        // Float images are converted to values, so they leave the buffer; they still
        // round-trip.
        let floats: Vec<u8> = (0..8)
            .flat_map(|v| (v as f32 / 8.0).to_le_bytes())
            .collect();
        let images = RawTensor::new("images", TensorDtype::F32, vec![2, 1, 2, 2], floats);
        let bundle = Bundle::from_parts(images.unwrap(), labels(&[5, 6])).unwrap();
        assert_eq!(parse_bundle_owned(bundle.to_safetensors()).unwrap(), bundle);
        assert!(matches!(
            parse_bundle_owned(b"just some text".to_vec()),
            Err(BundleError::UnknownFormat(_))
        ));
    }

    #[test]
    fn rejects_bad_targets() {
        let bundle = || Bundle::from_parts(images_u8(vec![2, 1, 1, 1]), labels(&[0, 1])).unwrap();
        let err = bundle().with_targets(labels(&[1])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`images` holds 2 samples but `targets` holds 1"
        );
        let err = bundle().with_targets(labels(&[1, -3])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`targets` contains -3 at index 1; class indices are 0 or more"
        );
        let float_targets =
            RawTensor::new("targets", TensorDtype::F32, vec![2], vec![0; 8]).unwrap();
        let err = bundle().with_targets(float_targets).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`targets` has dtype float32; expected int64"
        );
        let matrix = RawTensor::new("targets", TensorDtype::I64, vec![1, 2], vec![0; 16]).unwrap();
        let err = bundle().with_targets(matrix).unwrap_err();
        assert_eq!(err, BundleError::TargetsNotOneDimensional(vec![1, 2]));
        let err = bundle()
            .with_targets(labels(&[1, 10]))
            .unwrap()
            .check_labels_below(10)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`targets` contains 10 at index 1; targets must lie in 0..10"
        );
    }

    #[test]
    fn an_npz_entry_that_cannot_be_read_is_named_not_called_missing() {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for name in ["images.npy", "labels.npy"] {
            zip.start_file(name, stored).unwrap();
            zip.write_all(b"not read").unwrap();
        }
        let mut bytes = zip.finish().unwrap().into_inner();
        // Marks every entry bzip2-compressed (method 12), which this reader lacks: in
        // each local header (method at offset 8) and central directory header (10).
        for (signature, offset) in [(b"PK\x03\x04", 8), (b"PK\x01\x02", 10)] {
            let starts: Vec<usize> = bytes
                .windows(4)
                .enumerate()
                .filter(|(_, w)| w == signature)
                .map(|(i, _)| i)
                .collect();
            for start in starts {
                bytes[start + offset..start + offset + 2].copy_from_slice(&12u16.to_le_bytes());
            }
        }
        let err = read_npz(&bytes).unwrap_err().to_string();
        assert!(
            err.contains("npz entry `images.npy` cannot be read"),
            "{err}"
        );
    }

    #[test]
    fn reads_the_committed_mnist_fixture_npz() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mnist10k.npz");
        let bundle = load_bundle(&path).unwrap();
        assert_eq!(bundle.shape, [10_000, 1, 28, 28]);
        assert_eq!(bundle.dtype(), TensorDtype::U8);
        assert!(bundle.labels.iter().all(|&l| (0..10).contains(&l)));
    }
}
