//! The penalty that purifies suspect parameters.
//!
//! Adaptive regularization (AR) uses the penalty λ(θ²/2 + |θ|³/(3σ)), whose gradient
//! λθ(1 + |θ|/σ) grows faster than linearly with a weight's size relative to its
//! tensor's scale σ (the RMS of the tensor when purification starts): a large suspect
//! weight is pulled in hard, a small one gently. It is applied as an implicit
//! (backward-Euler) step, θ ← θ / (1 + ηλ(1 + |θ|/σ)), a factor in (0, 1]: the weight
//! shrinks monotonically and never changes sign, so it cannot oscillate around zero the
//! way an L1 subgradient step does when ηλ is large. L1 (λσ·sign θ) and L2 (λθ) remain
//! as explicit steps so the difference can be measured.

use tch::Tensor;

use super::config::Regularizer;
use super::error::EngineError;

/// The gradient of the AR penalty at θ.
pub fn ar_penalty_gradient(theta: f64, sigma: f64, lambda: f64) -> f64 {
    lambda * theta * (1.0 + theta.abs() / sigma)
}

/// The factor one AR step multiplies θ by, at learning rate `lr`.
pub fn ar_shrink_factor(theta: f64, sigma: f64, lambda: f64, lr: f64) -> f64 {
    1.0 / (1.0 + lr * lambda * (1.0 + theta.abs() / sigma))
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
                // θ − θ·f = θ·(1 − f) with f = 1 / (1 + ηλ(1 + |θ|/σ)).
                let factor = param
                    .f_abs()?
                    .f_div_scalar(sigma)?
                    .f_add_scalar(1.0)?
                    .f_mul_scalar(lr * lambda)?
                    .f_add_scalar(1.0)?
                    .f_reciprocal()?;
                param.f_mul(&factor.f_neg()?.f_add_scalar(1.0)?)?
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
    fn ar_gradient_grows_faster_than_linearly_with_magnitude() {
        let (sigma, lambda) = (0.1, 2.0);
        let mags = [0.0, 0.01, 0.05, 0.1, 0.3, 1.0];
        let grads: Vec<f64> = mags
            .iter()
            .map(|&m| ar_penalty_gradient(m, sigma, lambda))
            .collect();
        assert_eq!(grads[0], 0.0);
        for w in grads.windows(2) {
            assert!(w[1] > w[0], "gradient must grow with |θ|: {grads:?}");
        }
        // Per unit of θ the pull grows too: that is what separates AR from L2.
        let per_unit: Vec<f64> = mags[1..]
            .iter()
            .map(|&m| ar_penalty_gradient(m, sigma, lambda) / m)
            .collect();
        for w in per_unit.windows(2) {
            assert!(w[1] > w[0]);
        }
        assert_eq!(
            ar_penalty_gradient(-0.3, sigma, lambda),
            -ar_penalty_gradient(0.3, sigma, lambda)
        );
    }

    #[test]
    fn ar_step_never_flips_sign_even_at_huge_rates() {
        for &theta in &[-2.0, -0.01, 0.01, 2.0] {
            let f = ar_shrink_factor(theta, 0.1, 1e6, 10.0);
            assert!(f > 0.0 && f < 1.0);
            let mut t = Tensor::from_slice(&[theta as f32]);
            let mask = Tensor::from_slice(&[1.0f32]);
            apply(Regularizer::Ar, &mut t, &mask, 0.1, 1e6, 10.0).unwrap();
            let after = t.double_value(&[0]);
            assert!(after * theta >= 0.0 && after.abs() < theta.abs());
        }
    }

    #[test]
    fn tensor_step_matches_the_scalar_formula_and_respects_the_mask() {
        let mut t = Tensor::from_slice(&[0.5f32, -0.2, 0.5]);
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 0.0]);
        apply(Regularizer::Ar, &mut t, &mask, 0.25, 3.0, 0.1).unwrap();
        let expect = 0.5 * ar_shrink_factor(0.5, 0.25, 3.0, 0.1);
        assert!((t.double_value(&[0]) - expect).abs() < 1e-6);
        assert!((t.double_value(&[1]) + 0.2 * ar_shrink_factor(0.2, 0.25, 3.0, 0.1)).abs() < 1e-6);
        assert_eq!(t.double_value(&[2]), 0.5);
    }

    #[test]
    fn l1_overshoots_small_weights_where_ar_does_not() {
        // The oscillation the AR form is designed to avoid.
        let mut l1 = Tensor::from_slice(&[0.01f32]);
        let mut ar = Tensor::from_slice(&[0.01f32]);
        let mask = Tensor::from_slice(&[1.0f32]);
        apply(Regularizer::L1, &mut l1, &mask, 0.1, 10.0, 0.05).unwrap();
        apply(Regularizer::Ar, &mut ar, &mask, 0.1, 10.0, 0.05).unwrap();
        assert!(l1.double_value(&[0]) < 0.0, "L1 step crosses zero");
        assert!(ar.double_value(&[0]) > 0.0);
    }
}
