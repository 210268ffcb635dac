//! The human-readable report page: a summary table and, per layer, an inline SVG of
//! every neuron's normalised benign salience with the flagged ones in red.

use std::fmt::Write;

use crate::engine::report::LayerReport;
use crate::engine::ScanReport;

const PLOT_WIDTH: f64 = 640.0;
const PLOT_HEIGHT: f64 = 120.0;

pub fn report_page(job_id: &str, report: &ScanReport) -> String {
    let percent =
        |x: Option<f64>| x.map_or_else(|| "–".to_string(), |v| format!("{:.2}%", v * 100.0));
    let (before, after) = (&report.metrics.before, &report.metrics.after);
    let mut page = String::new();
    let _ = write!(
        page,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>bdscan report {id}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem}}\
         table{{border-collapse:collapse}}td,th{{padding:.25rem .75rem;border-bottom:1px solid #ddd;text-align:right}}\
         th:first-child,td:first-child{{text-align:left}}figure{{margin:1.5rem 0}}</style></head><body>\
         <h1>Backdoor scan report</h1><p>Job <code>{id}</code> · bdscan {version} · libtorch {torch}</p>\
         <table><tr><th></th><th>clean accuracy</th><th>attack success rate</th><th>robust accuracy</th></tr>\
         <tr><td>before</td><td>{b_acc}</td><td>{b_asr}</td><td>{b_ra}</td></tr>{removed}\
         <tr><td>after</td><td>{a_acc}</td><td>{a_asr}</td><td>{a_ra}</td></tr></table>\
         <p>Flagged {flagged} of {neurons} neurons ({pruned} pruned); {suspect} suspect weights, {pruned_w} pruned.{der}</p>{patterns}\
         <p>Purified model sha256 <code>{artifact}</code> ({bytes} bytes): <a href=\"/v1/jobs/{id}/artifact\">download</a> · \
         <a href=\"/v1/jobs/{id}/report\">report JSON</a></p><h2>Benign salience by layer</h2>\
         <p>Each bar is one neuron's salience relative to its layer's mean; red bars are flagged as not needed \
         by the clean task.</p>",
        id = escape(job_id),
        version = escape(&report.tool.bdscan_version),
        torch = escape(&report.tool.libtorch_version),
        b_acc = percent(Some(before.clean_acc)),
        b_asr = percent(before.asr),
        b_ra = percent(before.ra),
        // Identification alone: what zeroing the suspects did before any fine-tuning. Its
        // accuracy is on the held-out split, the other rows' on the test bundle if given.
        removed = report.suspects_removed.as_ref().map_or_else(String::new, |r| format!(
            "<tr><td>suspects zeroed, before fine-tuning (held-out accuracy)</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            percent(Some(r.held_out_acc)),
            percent(r.asr),
            percent(r.ra)
        )),
        a_acc = percent(Some(after.clean_acc)),
        a_asr = percent(after.asr),
        a_ra = percent(after.ra),
        flagged = report.flagged_count,
        neurons = report.model.neuron_count,
        pruned = report.pruned_neuron_count,
        suspect = report.suspect_weight_count,
        pruned_w = report.pruned_weight_count,
        der = report.der.map_or_else(String::new, |d| format!(" Defense effectiveness rating {d:.4}.")),
        // Whether purification also trained against random gratings, and why.
        patterns = report.pattern_probe.as_ref().map_or_else(String::new, |p| format!(
            "<p>Pattern unlearning {}: on the clean training split the arriving model scored {} as given and {} \
             under gratings of {:.0}% of the pixel range.{}</p>",
            if p.enabled { "on" } else { "off" },
            percent(Some(p.clean_acc)),
            percent(Some(p.patterned_acc)),
            p.amplitude * 100.0,
            p.warped_acc.map_or_else(String::new, |warped| format!(
                " Warp unlearning {}: {} under random warps of strength {}.",
                if p.warps_enabled { "on" } else { "off" },
                percent(Some(warped)),
                p.warp_strength
            ))
        )),
        artifact = escape(&report.artifact.sha256),
        bytes = report.artifact.bytes,
    );
    for layer in &report.layers {
        page.push_str(&salience_figure(layer));
    }
    page.push_str("</body></html>");
    page
}

fn salience_figure(layer: &LayerReport) -> String {
    let values = &layer.normalized_salience;
    let max = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let bar = PLOT_WIDTH / values.len().max(1) as f64;
    let mut svg = format!(
        "<figure><figcaption><code>{name}</code> · {width} neurons, {flagged} flagged</figcaption>\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{PLOT_WIDTH}\" height=\"{PLOT_HEIGHT}\" \
         viewBox=\"0 0 {PLOT_WIDTH} {PLOT_HEIGHT}\" role=\"img\" aria-label=\"salience of {name}\">\
         <rect width=\"100%\" height=\"100%\" fill=\"#fafafa\"/>",
        name = escape(&layer.name),
        width = layer.width,
        flagged = layer.flagged.len(),
    );
    for (i, value) in values.iter().enumerate() {
        let height = if value.is_finite() {
            (value / max).clamp(0.0, 1.0) * (PLOT_HEIGHT - 4.0)
        } else {
            0.0
        };
        let colour = if layer.flagged.contains(&i) {
            "#c0392b"
        } else {
            "#2c7fb8"
        };
        let _ = write!(
            svg,
            "<rect x=\"{:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{height:.2}\" fill=\"{colour}\"><title>neuron {i}: {value:.4}</title></rect>",
            i as f64 * bar,
            PLOT_HEIGHT - height,
            (bar * 0.9).max(0.5),
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
