//! `shapes`: a procedurally generated three-channel image dataset (no real colour image
//! set ships in a package registry this project can use offline, so one is drawn here).
//!
//! Ten classes of filled geometric shapes — circle, square, triangle, plus-cross, ring,
//! diamond, five-pointed star, striped square, L-shape, hexagon — each at a random centre,
//! size and rotation (within ±0.26 rad for square, diamond and cross, so that a rotated
//! square is not a diamond; ±0.5 rad for the others), in a random foreground colour on a random background colour with a
//! colour gradient and per-pixel noise, 3×32×32 uint8, rendered with 2×2 supersampling.
//! Circle/hexagon, square/diamond at small sizes and low-contrast colour pairs keep it a
//! real learning task. Everything comes from one seed: the same seed gives the same bytes.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::bundle::{Bundle, RawTensor, TensorDtype};

pub const CLASSES: [&str; 10] = [
    "circle", "square", "triangle", "cross", "ring", "diamond", "star", "stripes", "l-shape",
    "hexagon",
];
pub const SIDE: usize = 32;

/// Seeds of the fixed splits: every lab run sees the same images.
pub const TRAIN_SEED: u64 = 0x5a9e_0001;
pub const TEST_SEED: u64 = 0x5a9e_0002;

/// `n` images, labels cycling through the classes (so every class has n/10 ± 1), from `seed`.
pub fn generate(n: usize, seed: u64) -> Bundle {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut pixels = Vec::with_capacity(n * 3 * SIDE * SIDE);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = i % CLASSES.len();
        pixels.extend(render(label, &mut rng));
        labels.push(label as i64);
    }
    let images = RawTensor::new("images", TensorDtype::U8, vec![n, 3, SIDE, SIDE], pixels)
        .expect("shape matches data");
    let labels = RawTensor::new(
        "labels",
        TensorDtype::I64,
        vec![n],
        labels.iter().flat_map(|l| l.to_le_bytes()).collect(),
    )
    .expect("shape matches data");
    Bundle::from_parts(images, labels).expect("generated bundle is valid")
}

fn inside_polygon(points: &[(f32, f32)], u: f32, v: f32) -> bool {
    let mut inside = false;
    let mut j = points.len() - 1;
    for i in 0..points.len() {
        let ((xi, yi), (xj, yj)) = (points[i], points[j]);
        if (yi > v) != (yj > v) && u < (xj - xi) * (v - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

fn regular_polygon(sides: usize, radius_at: impl Fn(usize) -> f32) -> Vec<(f32, f32)> {
    (0..sides)
        .map(|k| {
            let a = std::f32::consts::PI * (0.5 + 2.0 * k as f32 / sides as f32);
            (radius_at(k) * a.cos(), radius_at(k) * a.sin())
        })
        .collect()
}

/// Whether (u, v), in the shape's own coordinates (the shape spans about [-1, 1]), is on it.
fn on_shape(label: usize, u: f32, v: f32, polygon: &[(f32, f32)]) -> bool {
    let r2 = u * u + v * v;
    match label {
        0 => r2 <= 1.0,
        1 => u.abs() <= 0.8 && v.abs() <= 0.8,
        3 => (u.abs() <= 0.3 && v.abs() <= 1.0) || (v.abs() <= 0.3 && u.abs() <= 1.0),
        4 => (0.36..=1.0).contains(&r2),
        5 => u.abs() + v.abs() <= 1.05,
        7 => u.abs() <= 0.85 && v.abs() <= 0.85 && ((u + 1.0) * 2.5).floor() as i32 % 2 == 0,
        8 => {
            (-0.8..=-0.25).contains(&u) && v.abs() <= 0.9
                || (-0.8..=0.8).contains(&u) && (0.35..=0.9).contains(&v)
        }
        _ => inside_polygon(polygon, u, v),
    }
}

fn render(label: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let polygon = match label {
        2 => regular_polygon(3, |_| 1.0),
        6 => regular_polygon(10, |k| if k % 2 == 0 { 1.0 } else { 0.45 }),
        9 => regular_polygon(6, |_| 1.0),
        _ => Vec::new(),
    };
    let radius = rng.gen_range(8.0f32..13.0);
    let cx = rng.gen_range(radius.min(15.0)..(SIDE as f32 - radius.min(15.0)));
    let cy = rng.gen_range(radius.min(15.0)..(SIDE as f32 - radius.min(15.0)));
    let angle = match label {
        1 | 3 | 5 => rng.gen_range(-0.26f32..0.26),
        _ => rng.gen_range(-0.5f32..0.5),
    };
    let (sin, cos) = angle.sin_cos();
    let foreground: [f32; 3] = std::array::from_fn(|_| rng.gen_range(0.0..1.0));
    // A background at least a little different from the foreground.
    let background: [f32; 3] = loop {
        let candidate: [f32; 3] = std::array::from_fn(|_| rng.gen_range(0.0..1.0));
        let distance: f32 = (0..3).map(|c| (candidate[c] - foreground[c]).abs()).sum();
        if distance > 0.8 {
            break candidate;
        }
    };
    let gradient: [f32; 3] = std::array::from_fn(|_| rng.gen_range(-0.15..0.15));
    let gradient_angle = rng.gen_range(0.0f32..std::f32::consts::TAU);
    let noise = rng.gen_range(0.0f32..0.06);
    let mut out = vec![0u8; 3 * SIDE * SIDE];
    for y in 0..SIDE {
        for x in 0..SIDE {
            let mut coverage = 0.0;
            for (oy, ox) in [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)] {
                let (dx, dy) = ((x as f32 + ox - cx) / radius, (y as f32 + oy - cy) / radius);
                let (u, v) = (cos * dx + sin * dy, -sin * dx + cos * dy);
                if on_shape(label, u, v, &polygon) {
                    coverage += 0.25;
                }
            }
            let t = ((x as f32 - 16.0) * gradient_angle.cos()
                + (y as f32 - 16.0) * gradient_angle.sin())
                / 16.0;
            for c in 0..3 {
                let back = background[c] + gradient[c] * t;
                let value = coverage * foreground[c]
                    + (1.0 - coverage) * back
                    + noise * (rng.gen::<f32>() * 2.0 - 1.0);
                out[(c * SIDE + y) * SIDE + x] = (value.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_deterministic_balanced_and_three_channel() {
        let a = generate(50, 9);
        let b = generate(50, 9);
        assert_eq!(a.pixels, b.pixels);
        assert_eq!(a.labels, b.labels);
        assert_eq!(a.shape, [50, 3, 32, 32]);
        for class in 0..10 {
            assert_eq!(a.labels.iter().filter(|&&l| l == class).count(), 5);
        }
        assert_ne!(generate(50, 10).pixels, a.pixels);
    }

    #[test]
    fn shapes_differ_from_their_background() {
        // A shape covers a good share of the image whatever its class.
        for label in 0..10 {
            let mut rng = ChaCha8Rng::seed_from_u64(label as u64);
            let image = render(label, &mut rng);
            let mean = image.iter().map(|&p| p as f64).sum::<f64>() / image.len() as f64;
            let var = image
                .iter()
                .map(|&p| (p as f64 - mean).powi(2))
                .sum::<f64>()
                / image.len() as f64;
            assert!(var > 100.0, "class {label}: too flat (variance {var})");
        }
    }
}
