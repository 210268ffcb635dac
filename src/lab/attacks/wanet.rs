//! WaNet (Nguyen & Tran, 2021): an imperceptible, fixed geometric warp. A k×k field of
//! random offsets (the control points), normalised to mean magnitude 1, is upsampled to
//! the image size; the warp samples the image at identity + s·field/H (normalised
//! coordinates, clamped to the image), with bilinear interpolation. Noise mode: besides the
//! poisoned samples, `cross_ratio` times as many training samples get the warp plus a
//! per-sample random jitter of up to one pixel and keep their true labels, so the model
//! must learn this exact warp, not "any warp".
//!
//! Differences from the paper: the control grid is upsampled bilinearly (the paper uses
//! bicubic). The paper's s = 0.5 is the default: on the MNIST fixture the VGG-style CNN
//! learns it in 4 epochs (ASR ≈ 99.8%, see the README's lab table), so it was not raised.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{Image, Trigger};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WaNet {
    /// Control points per side.
    pub grid: usize,
    /// Warp strength s.
    pub strength: f32,
    /// Seed of the control points (part of the trigger, not of the run).
    pub field_seed: u64,
}

impl Default for WaNet {
    fn default() -> Self {
        WaNet {
            grid: 4,
            strength: 0.5,
            field_seed: 5,
        }
    }
}

impl WaNet {
    /// Sampling positions (x, y) in normalised [-1, 1] coordinates for every output pixel.
    fn sampling_grid(&self, height: usize, width: usize) -> Vec<(f32, f32)> {
        let k = self.grid.max(2);
        let mut rng = ChaCha8Rng::seed_from_u64(self.field_seed);
        let mut control: Vec<(f32, f32)> = (0..k * k)
            .map(|_| (rng.gen_range(-1.0..1.0), rng.gen_range(-1.0..1.0)))
            .collect();
        let mean_abs =
            control.iter().map(|(a, b)| a.abs() + b.abs()).sum::<f32>() / (2 * k * k) as f32;
        for (a, b) in &mut control {
            *a /= mean_abs;
            *b /= mean_abs;
        }
        let mut out = Vec::with_capacity(height * width);
        for y in 0..height {
            for x in 0..width {
                // Bilinear upsampling of the control grid, corners aligned.
                let gy = y as f32 * (k - 1) as f32 / (height - 1).max(1) as f32;
                let gx = x as f32 * (k - 1) as f32 / (width - 1).max(1) as f32;
                let (y0, x0) = ((gy as usize).min(k - 2), (gx as usize).min(k - 2));
                let (fy, fx) = (gy - y0 as f32, gx - x0 as f32);
                let at = |yy: usize, xx: usize| control[yy * k + xx];
                let lerp = |a: (f32, f32), b: (f32, f32), t: f32| {
                    (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t)
                };
                let top = lerp(at(y0, x0), at(y0, x0 + 1), fx);
                let bottom = lerp(at(y0 + 1, x0), at(y0 + 1, x0 + 1), fx);
                let (dx, dy) = lerp(top, bottom, fy);
                let ix = 2.0 * x as f32 / (width - 1).max(1) as f32 - 1.0;
                let iy = 2.0 * y as f32 / (height - 1).max(1) as f32 - 1.0;
                let s = self.strength / height as f32;
                out.push((
                    (ix + s * dx).clamp(-1.0, 1.0),
                    (iy + s * dy).clamp(-1.0, 1.0),
                ));
            }
        }
        out
    }

    fn warp(image: &mut Image, grid: &[(f32, f32)]) {
        let (h, w) = (image.height, image.width);
        let source = image.pixels.clone();
        for c in 0..image.channels {
            let plane = &source[c * h * w..(c + 1) * h * w];
            for (k, &(gx, gy)) in grid.iter().enumerate() {
                // align_corners = true: −1 and 1 are the centres of the edge pixels.
                let sx = (gx + 1.0) / 2.0 * (w - 1) as f32;
                let sy = (gy + 1.0) / 2.0 * (h - 1) as f32;
                let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
                let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
                let v = plane[y0 * w + x0] * (1.0 - fx) * (1.0 - fy)
                    + plane[y0 * w + x1] * fx * (1.0 - fy)
                    + plane[y1 * w + x0] * (1.0 - fx) * fy
                    + plane[y1 * w + x1] * fx * fy;
                image.pixels[c * h * w + k] = v;
            }
        }
    }
}

impl Trigger for WaNet {
    fn apply(&self, image: &mut Image, _rng: &mut ChaCha8Rng) {
        let grid = self.sampling_grid(image.height, image.width);
        Self::warp(image, &grid);
    }

    fn cross(&self, image: &mut Image, rng: &mut ChaCha8Rng) -> Option<()> {
        let h = image.height as f32;
        let grid: Vec<(f32, f32)> = self
            .sampling_grid(image.height, image.width)
            .into_iter()
            .map(|(x, y)| {
                let jx = rng.gen_range(-1.0..1.0) / h;
                let jy = rng.gen_range(-1.0..1.0) / h;
                ((x + jx).clamp(-1.0, 1.0), (y + jy).clamp(-1.0, 1.0))
            })
            .collect();
        Self::warp(image, &grid);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{map_image, Poisoning, TargetMode};
    use super::*;

    fn textured(c: usize) -> crate::engine::bundle::Bundle {
        let mut bundle = flat(1, c, 12, 12, 0, 1);
        if let crate::engine::bundle::Pixels::U8(v) = &mut bundle.pixels {
            for (i, p) in v.iter_mut().enumerate() {
                *p = ((i * 37) % 251) as u8;
            }
        }
        bundle
    }

    #[test]
    fn zero_strength_is_the_identity() {
        let mut bundle = textured(3);
        let before = bundle.pixels.clone();
        let attack = WaNet {
            strength: 0.0,
            ..WaNet::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        map_image(&mut bundle, 0, |img| attack.apply(img, &mut rng));
        assert_eq!(bundle.pixels, before);
    }

    #[test]
    fn warps_deterministically_and_cross_samples_keep_labels() {
        let attack = WaNet {
            strength: 4.0,
            ..WaNet::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (mut a, mut b) = (textured(1), textured(1));
        map_image(&mut a, 0, |img| attack.apply(img, &mut rng));
        map_image(&mut b, 0, |img| attack.apply(img, &mut rng));
        assert_eq!(a.pixels, b.pixels);
        assert_ne!(a.pixels, textured(1).pixels);

        let clean = flat(20, 1, 8, 8, 0, 2);
        let mut clean = clean;
        if let crate::engine::bundle::Pixels::U8(v) = &mut clean.pixels {
            for (i, p) in v.iter_mut().enumerate() {
                *p = ((i * 37) % 251) as u8;
            }
        }
        let p = Poisoning {
            mode: TargetMode::AllToOne { target: 0 },
            rate: 0.1,
            clean_label: false,
            cross_ratio: 2.0,
        };
        let out = p.poison_training_set(&clean, &attack, &mut rng);
        let touched = changed(&clean, &out);
        assert_eq!(touched.len(), 6);
        let relabelled = (0..20)
            .filter(|&i| out.labels[i] != clean.labels[i])
            .count();
        assert!(relabelled <= 2);
    }
}
