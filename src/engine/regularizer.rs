//! The penalty that purifies suspect parameters.
//!
//! Adaptive regularization (AR) pulls each suspect weight with a strength that adapts to
//! its magnitude relative to its tensor's scale σ (the RMS of the tensor when
//! purification starts): the penalty λ(σ|θ| + θ²/2 + |θ|³/(3σ)) has the gradient
//! λσ·sign θ·(1 + |θ|/σ + θ²/σ²). A small weight feels a constant pull, so it reaches
//! zero in a bounded number of steps as under L1; a large one is pulled in ever harder,
//! where L1 would take a number of steps proportional to its size and L2 only shrinks it
//! geometrically. It is applied as a proximal step: the constant part as soft
//! thresholding, θ ← sign θ·max(|θ| − ηλσ, 0), then the rest implicitly (backward
//! Euler), θ ← θ / (1 + ηλ(1 + |θ|/σ)). Both parts only shrink a weight towards zero and
//! never across it, so it cannot oscillate around zero the way an explicit L1 subgradient
//! step does when ηλ is large. L1 (λσ·sign θ) and L2 (λθ) remain as explicit steps so the
//! difference can be measured; at the same λ the AR pull is at least as strong as either
//! at every magnitude.

use tch::Tensor;

use super::config::Regularizer;
use super::error::EngineError;

/// The gradient of the AR penalty at θ.
pub fn ar_penalty_gradient(theta: f64, sigma: f64, lambda: f64) -> f64 {
    if theta == 0.0 {
        return 0.0;
    }
    let m = theta.abs() / sigma;
    lambda * sigma * theta.signum() * (1.0 + m + m * m)
}

/// θ after one AR step at learning rate `lr`.
pub fn ar_step(theta: f64, sigma: f64, lambda: f64, lr: f64) -> f64 {
    let thresholded = theta.signum() * (theta.abs() - lr * lambda * sigma).max(0.0);
    thresholded / (1.0 + lr * lambda * (1.0 + thresholded.abs() / sigma))
}

/// A tensor's scale for the adaptive penalty: its RMS, floored so that an all-zero
/// tensor does not divide by zero.
pub fn tensor_scale(t: &Tensor) -> Result<f64, EngineError> {
    let rms = t
        .f_square()?
        .f_mean(tch::Kind::Double)?
        .f_sqrt()?
        .f_double_value(&[])?;
    Ok(rms.max(1e-8))
}

/// One regularization step on the entries of `param` where `mask` (1.0/0.0, same shape) is set.
pub fn apply(
    kind: Regularizer,
    param: &mut Tensor,
    mask: &Tensor,
    sigma: f64,
    lambda: f64,
    lr: f64,
) -> Result<(), EngineError> {
    tch::no_grad(|| -> Result<(), EngineError> {
        let delta = match kind {
            Regularizer::None => return Ok(()),
            Regularizer::Ar => {
                // Soft thresholding, then the implicit step on what is left: the
                // result is `ar_step` entrywise, and the delta is θ minus it.
                let magnitude = param
                    .f_abs()?
                    .f_sub_scalar(lr * lambda * sigma)?
                    .f_clamp_min(0.0)?;
                let shrunk = magnitude.f_div(
                    &magnitude
                        .f_div_scalar(sigma)?
                        .f_add_scalar(1.0)?
                        .f_mul_scalar(lr * lambda)?
                        .f_add_scalar(1.0)?,
                )?;
                param.f_sub(&shrunk.f_mul(&param.f_sign()?)?)?
            }
            Regularizer::L1 => param.f_sign()?.f_mul_scalar(lr * lambda * sigma)?,
            Regularizer::L2 => param.f_mul_scalar(lr * lambda)?,
        };
        let _ = param.f_sub_(&delta.f_mul(mask)?)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ar_pull_is_at_least_l1_and_l2_at_every_magnitude() {
        let (sigma, lambda) = (0.1, 2.0);
        for &m in &[1e-4, 0.01, 0.05, 0.1, 0.3, 1.0] {
            let ar = ar_penalty_gradient(m, sigma, lambda);
            assert!(ar >= lambda * sigma, "L1 at {m}");
            assert!(ar >= lambda * m, "L2 at {m}");
        }
    }

    #[test]
    fn ar_gradient_grows_faster_than_linearly_with_magnitude() {
        let (sigma, lambda) = (0.1, 2.0);
        let mags = [0.0, 0.01, 0.05, 0.1, 0.3, 1.0];
        let grads: Vec<f64> = mags
            .iter()
            .map(|&m| ar_penalty_gradient(m, sigma, lambda))
            .collect();
        assert_eq!(grads[0], 0.0);
        for w in grads[1..].windows(2) {
            assert!(w[1] > w[0], "gradient must grow with |θ|: {grads:?}");
        }
        // Beyond the constant floor the pull grows faster than θ: that is what separates
        // AR from L1 + L2.
        let above_floor: Vec<f64> = mags[2..]
            .iter()
            .map(|&m| (ar_penalty_gradient(m, sigma, lambda) - lambda * sigma) / m)
            .collect();
        for w in above_floor.windows(2) {
            assert!(w[1] > w[0]);
        }
        assert_eq!(
            ar_penalty_gradient(-0.3, sigma, lambda),
            -ar_penalty_gradient(0.3, sigma, lambda)
        );
    }

    #[test]
    fn ar_step_never_flips_sign_even_at_huge_rates() {
        for &(lambda, lr) in &[(1e6, 10.0), (10.0, 0.05), (10.0, 0.001)] {
            for &theta in &[-2.0, -0.01, 0.01, 2.0] {
                let stepped = ar_step(theta, 0.1, lambda, lr);
                assert!(stepped * theta >= 0.0 && stepped.abs() < theta.abs());
                let mut t = Tensor::from_slice(&[theta as f32]);
                let mask = Tensor::from_slice(&[1.0f32]);
                apply(Regularizer::Ar, &mut t, &mask, 0.1, lambda, lr).unwrap();
                let after = t.double_value(&[0]);
                assert!(after * theta >= 0.0 && after.abs() < theta.abs());
            }
        }
    }

    #[test]
    fn ar_zeroes_small_weights_in_finitely_many_steps_and_shrinks_every_size_faster() {
        let (sigma, lambda, lr) = (0.1, 10.0, 0.01);
        for &theta0 in &[0.005f64, 0.05, 0.2, 0.5] {
            let (mut ar, mut l1, mut l2) = (theta0, theta0, theta0);
            for _ in 0..20 {
                ar = ar_step(ar, sigma, lambda, lr);
                l1 -= (lr * lambda * sigma).min(l1);
                l2 -= lr * lambda * l2;
                assert!(
                    ar <= l1 && ar <= l2,
                    "from {theta0}: ar {ar} l1 {l1} l2 {l2}"
                );
            }
        }
        assert_eq!(ar_step(0.005, sigma, lambda, lr), 0.0);
    }

    #[test]
    fn tensor_step_matches_the_scalar_formula_and_respects_the_mask() {
        let mut t = Tensor::from_slice(&[0.5f32, -0.2, 0.5]);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 0.0]);
        apply(Regularizer::Ar, &mut t, &mask, 0.25, 3.0, 0.1).unwrap();
        assert!((t.double_value(&[0]) - ar_step(0.5, 0.25, 3.0, 0.1)).abs() < 1e-6);
        assert!((t.double_value(&[1]) - ar_step(-0.2, 0.25, 3.0, 0.1)).abs() < 1e-6);
        assert_eq!(t.double_value(&[2]), 0.5);
    }

    #[test]
    fn l1_overshoots_small_weights_where_ar_stops_at_zero() {
        // The oscillation the AR form is designed to avoid.
        let mut l1 = Tensor::from_slice(&[0.01f32]);
        let mut ar = Tensor::from_slice(&[0.01f32]);
        let mask = Tensor::from_slice(&[1.0f32]);
        apply(Regularizer::L1, &mut l1, &mask, 0.1, 10.0, 0.05).unwrap();
        apply(Regularizer::Ar, &mut ar, &mask, 0.1, 10.0, 0.05).unwrap();
        assert!(l1.double_value(&[0]) < 0.0, "L1 step crosses zero");
        assert_eq!(ar.double_value(&[0]), 0.0, "AR stops at zero");
    }
}
