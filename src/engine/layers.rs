//! Which parameters make up a neuron.
//!
//! A TorchScript archive gives us only named parameters in module registration order, so
//! the grouping is read off names and shapes: every parameter with two or more dims
//! starts a layer whose dim-0 slices are its neurons; the layer's own `bias` and the
//! 1-D affine parameters registered right after it with the same width (a BatchNorm or
//! similar normalisation that follows it) join those neurons. Zeroing a conv channel but
//! not its BatchNorm shift would leave a constant output, which is why the BN channel
//! belongs to the neuron. Pure Rust, so the rules are tested without libtorch.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerGroup {
    /// The weight's module path, e.g. `features.0`.
    pub name: String,
    /// Index of the ≥2-D weight in the parameter list.
    pub weight: usize,
    /// Indices of the 1-D parameters whose entry k belongs to neuron k (bias, BN γ/β).
    pub members: Vec<usize>,
    /// Number of neurons (dim 0 of the weight).
    pub width: usize,
    /// The last layer whose width equals the number of classes: its units are classes.
    pub is_classifier: bool,
}

/// Groups parameters (names and shapes, in registration order) into layers of neurons.
/// Parameters that fit no layer (a 1-D parameter of another width, a scalar) are left out.
pub fn group_layers(params: &[(String, Vec<i64>)], num_classes: i64) -> Vec<LayerGroup> {
    let mut layers: Vec<LayerGroup> = Vec::new();
    for (index, (name, shape)) in params.iter().enumerate() {
        if shape.len() >= 2 {
            if shape[0] > 0 {
                layers.push(LayerGroup {
                    name: module_path(name).to_string(),
                    weight: index,
                    members: Vec::new(),
                    width: shape[0] as usize,
                    is_classifier: false,
                });
            }
            continue;
        }
        let Some(layer) = layers.last_mut() else {
            continue;
        };
        let same_width = shape.len() == 1 && shape[0] as usize == layer.width;
        // Only the layer's own bias or parameters registered before the next weight
        // qualify; anything later belongs to a different part of the network.
        let last_member = layer.members.last().copied().unwrap_or(layer.weight);
        if same_width && last_member + 1 == index {
            layer.members.push(index);
        }
    }
    if let Some(classifier) = layers
        .iter_mut()
        .rev()
        .find(|l| l.width as i64 == num_classes)
    {
        classifier.is_classifier = true;
    } else if let Some(last) = layers.last_mut() {
        last.is_classifier = true;
    }
    layers
}

fn module_path(param_name: &str) -> &str {
    param_name
        .rsplit_once('.')
        .map_or(param_name, |(module, _)| module)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, shape: &[i64]) -> (String, Vec<i64>) {
        (name.to_string(), shape.to_vec())
    }

    #[test]
    fn groups_conv_with_its_bias_and_following_batchnorm() {
        let params = vec![
            p("features.0.weight", &[16, 1, 3, 3]),
            p("features.0.bias", &[16]),
            p("features.1.weight", &[16]),
            p("features.1.bias", &[16]),
            p("classifier.0.weight", &[10, 784]),
            p("classifier.0.bias", &[10]),
        ];
        let layers = group_layers(&params, 10);
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0].name, "features.0");
        assert_eq!(layers[0].members, vec![1, 2, 3]);
        assert!(!layers[0].is_classifier);
        assert_eq!(layers[1].members, vec![5]);
        assert!(layers[1].is_classifier);
    }

    #[test]
    fn resnet_style_bias_free_conv_takes_its_batchnorm() {
        let params = vec![
            p("conv1.weight", &[8, 3, 3, 3]),
            p("bn1.weight", &[8]),
            p("bn1.bias", &[8]),
            p("layer1.0.conv1.weight", &[8, 8, 3, 3]),
            p("layer1.0.bn1.weight", &[8]),
            p("layer1.0.bn1.bias", &[8]),
            p("fc.weight", &[10, 8]),
            p("fc.bias", &[10]),
        ];
        let layers = group_layers(&params, 10);
        assert_eq!(layers[0].members, vec![1, 2]);
        assert_eq!(layers[1].members, vec![4, 5]);
        assert!(layers[2].is_classifier);
    }

    #[test]
    fn one_dimensional_parameters_of_another_width_are_left_out() {
        let params = vec![
            p("a.weight", &[4, 2]),
            p("scale", &[3]),
            p("out.weight", &[2, 4]),
        ];
        let layers = group_layers(&params, 2);
        assert!(layers[0].members.is_empty());
        assert!(layers[1].is_classifier);
    }

    #[test]
    fn the_classifier_is_the_last_layer_as_wide_as_the_class_count() {
        // A trailing projection of another width does not hide the real classifier.
        let params = vec![p("head.weight", &[10, 32]), p("aux.weight", &[5, 10])];
        let layers = group_layers(&params, 10);
        assert!(layers[0].is_classifier);
        assert!(!layers[1].is_classifier);
    }
}
