//! The human-readable report page: a summary (what ran, what the shortcut search found,
//! what changed), the report's warnings, the metrics, the inputs with their hashes, the
//! configuration and, per layer, an inline SVG of every neuron's normalised benign
//! salience with the flagged ones in red (and, when the ranking was relative to a
//! shortcut, both scores in each bar's title).

use std::fmt::Write;

use crate::engine::report::{BundleDigest, Inputs, LayerReport, TargetSearch};
use crate::engine::salience::layer_mean;
use crate::engine::ScanReport;

const PLOT_WIDTH: f64 = 640.0;
const PLOT_HEIGHT: f64 = 120.0;

pub fn report_page(job_id: &str, report: &ScanReport) -> String {
    let percent =
        |x: Option<f64>| x.map_or_else(|| "–".to_string(), |v| format!("{:.2}%", v * 100.0));
    let (before, after) = (&report.metrics.before, &report.metrics.after);
    let configuration = format!(
        "<details><summary>Configuration (seed {})</summary><pre>{}</pre></details>",
        report.seed,
        escape(&serde_json::to_string_pretty(&report.config).unwrap_or_default())
    );
    let mut page = String::new();
    let _ = write!(
        page,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>bdscan report {id}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem}}\
         table{{border-collapse:collapse}}td,th{{padding:.25rem .75rem;border-bottom:1px solid #ddd;text-align:right}}\
         th:first-child,td:first-child{{text-align:left}}figure{{margin:1.5rem 0}}</style></head><body>\
         <h1>Backdoor scan report</h1><p>Job <code>{id}</code> · bdscan {version} · libtorch {torch}</p>\
         {summary}{warnings}<h2>Metrics</h2><table><tr><th></th><th>clean accuracy</th><th>attack success rate</th><th>robust accuracy</th></tr>\
         <tr><td>before</td><td>{b_acc}</td><td>{b_asr}</td><td>{b_ra}</td></tr>{removed}\
         <tr><td>after</td><td>{a_acc}</td><td>{a_asr}</td><td>{a_ra}</td></tr></table>\
         <p>Flagged {flagged} of {neurons} neurons ({pruned} pruned); {suspect} suspect weights, {pruned_w} pruned.{der}</p>{patterns}\
         <p>Purified model sha256 <code>{artifact}</code> ({bytes} bytes): <a href=\"/v1/jobs/{id}/artifact\">download</a> · \
         <a href=\"/v1/jobs/{id}/report\">report JSON</a></p>{inputs}{config}<h2>Benign salience by layer</h2>\
         <p>Each bar is one neuron's salience relative to its layer's mean; red bars are flagged as not needed \
         by the clean task{ranked}.</p>",
        ranked = match report.selection.shortcut_target {
            Some(target) => format!(
                " and, relative to that, needed by the shortcut to class {target} (hover a bar \
                 for both scores)"
            ),
            None => String::new(),
        },
        id = escape(job_id),
        summary = summary(report),
        warnings = warnings_list(&report.warnings),
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
        inputs = inputs_table(&report.inputs),
        config = configuration,
    );
    for layer in &report.layers {
        page.push_str(&salience_figure(layer));
    }
    page.push_str("</body></html>");
    page
}

/// What ran, what the shortcut search found and what changed, in a few lines.
fn summary(report: &ScanReport) -> String {
    let percent = |v: f64| format!("{:.2}%", v * 100.0);
    let config = &report.config;
    let regularizer = serde_json::to_value(config.regularizer)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut items = vec![format!(
        "Method <code>{}</code> (penalty <code>{}</code>), seed {}, on <code>{}</code>.",
        config.method.as_str(),
        escape(&regularizer),
        report.seed,
        escape(&config.device)
    )];
    if let Some(search) = &report.shortcut_search {
        items.push(shortcut_line(search));
    }
    let (before, after) = (&report.metrics.before, &report.metrics.after);
    if let (Some(b), Some(a)) = (before.asr, after.asr) {
        let target = report
            .inputs
            .target_label
            .map_or_else(String::new, |t| format!(" (target class {t})"));
        items.push(format!(
            "Attack success rate on the poison bundle{target}: {} before, {} after.",
            percent(b),
            percent(a)
        ));
    }
    let on = match after.clean_acc_on {
        crate::engine::metrics::AccuracySource::Test => "the test bundle",
        crate::engine::metrics::AccuracySource::HeldOut => "the clean bundle's held-out split",
    };
    items.push(format!(
        "Clean accuracy on {on}: {} before, {} after.",
        percent(before.clean_acc),
        percent(after.clean_acc)
    ));
    let mut html = String::from("<h2>Summary</h2><ul>");
    for item in items {
        let _ = write!(html, "<li>{item}</li>");
    }
    html.push_str("</ul>");
    html
}

/// The shortcut search's finding: a class that one small perturbation reaches from
/// nearly every clean image, far ahead of the rest, is how a trigger's target looks.
fn shortcut_line(search: &TargetSearch) -> String {
    let mut ranked: Vec<(usize, f64)> = search
        .success_per_class
        .iter()
        .copied()
        .enumerate()
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let reached = |k: usize| {
        search
            .success_per_class
            .get(k)
            .map_or_else(|| "–".to_string(), |v| format!("{:.0}%", v * 100.0))
    };
    let radius = format!("{:.0}% of the pixel range (RMS)", search.radius_rms * 100.0);
    match search.target {
        Some(target) => {
            let runner_up = ranked
                .iter()
                .find(|(k, _)| *k as i64 != target)
                .map_or_else(String::new, |&(k, v)| {
                    format!("; the next class, {k}, from {:.0}%", v * 100.0)
                });
            let rule = match search.found_by {
                Some(crate::engine::unlearn::FoundBy::Locality) => {
                    " and concentrated on few pixels"
                }
                _ => "",
            };
            format!(
                "Shortcut search: <strong>class {target} stands out</strong>: one perturbation of \
                 {radius}{rule} sends {} of clean images to it{runner_up}. That is how a \
                 trigger's target looks; purification trained against it.",
                reached(target as usize)
            )
        }
        None => {
            let best = ranked.first().map_or_else(String::new, |&(k, v)| {
                format!(" (the easiest, class {k}, from {:.0}%)", v * 100.0)
            });
            format!(
                "Shortcut search: no class stood out{best} under a perturbation of {radius}: \
                 no sign of an all-to-one trigger's shortcut."
            )
        }
    }
}

fn warnings_list(warnings: &[String]) -> String {
    if warnings.is_empty() {
        return String::new();
    }
    let mut html = String::from("<h2>Warnings</h2><ul>");
    for warning in warnings {
        let _ = write!(html, "<li>{}</li>", escape(warning));
    }
    html.push_str("</ul>");
    html
}

fn inputs_table(inputs: &Inputs) -> String {
    let mut html = String::from(
        "<h2>Inputs</h2><table><tr><th>file</th><th>sha256</th><th>bytes</th><th>samples</th>\
         <th>images</th></tr>",
    );
    let _ = write!(
        html,
        "<tr><td>model</td><td><code>{}</code></td><td>{}</td><td></td><td></td></tr>",
        escape(&inputs.model.sha256),
        inputs.model.bytes
    );
    let bundles = [
        ("clean", Some(&inputs.clean)),
        ("test", inputs.test.as_ref()),
        ("poison", inputs.poison.as_ref()),
    ];
    for (role, bundle) in bundles {
        let Some(BundleDigest {
            sha256,
            bytes,
            samples,
            image_shape: [c, h, w],
            dtype,
        }) = bundle
        else {
            continue;
        };
        let _ = write!(
            html,
            "<tr><td>{role}</td><td><code>{}</code></td><td>{bytes}</td><td>{samples}</td>\
             <td>{c}×{h}×{w} {}</td></tr>",
            escape(sha256),
            escape(dtype)
        );
    }
    html.push_str("</table>");
    html
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
    // Ranked relative to a shortcut, the flagged neurons need not be the lowest bars:
    // the caption says so and each bar's title gives the shortcut's salience (over its
    // layer mean, like the bars) and the score the ranking used.
    let shortcut = layer.shortcut_salience.as_deref().map(|scores| {
        let mean = layer_mean(scores);
        scores.iter().map(|s| s / mean).collect::<Vec<f64>>()
    });
    let relative = layer.relative_salience.as_deref();
    let ranking = if shortcut.is_some() {
        " (ranked relative to the shortcut's salience)"
    } else {
        ""
    };
    // Looked up per bar: `flagged.contains` per bar was quadratic in the layer's width.
    let mut is_flagged = vec![false; values.len()];
    for &i in &layer.flagged {
        if let Some(slot) = is_flagged.get_mut(i) {
            *slot = true;
        }
    }
    let mut svg = format!(
        "<figure><figcaption><code>{name}</code> · {width} neurons, {flagged} flagged{ranking}</figcaption>\
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
        let colour = if is_flagged[i] { "#c0392b" } else { "#2c7fb8" };
        let title = match (
            shortcut.as_ref().and_then(|s| s.get(i)),
            relative.and_then(|r| r.get(i)),
        ) {
            (Some(s), Some(r)) => {
                format!("neuron {i}: {value:.4}, shortcut {s:.4}, ranked by {r:.4}")
            }
            _ => format!("neuron {i}: {value:.4}"),
        };
        let _ = write!(
            svg,
            "<rect x=\"{:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{height:.2}\" fill=\"{colour}\"><title>{title}</title></rect>",
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
    use super::{escape, salience_figure, shortcut_line, warnings_list};
    use crate::engine::report::{LayerReport, TargetSearch};
    use crate::engine::unlearn::FoundBy;

    #[test]
    fn the_shortcut_line_names_the_target_and_the_runner_up() {
        let mut search = TargetSearch {
            radius_rms: 0.03,
            radius: 0.03,
            success_per_class: vec![0.12, 0.05, 0.98, 0.4],
            locality_per_class: vec![],
            target: Some(2),
            found_by: Some(FoundBy::Reach),
            passed_radius_rms: None,
        };
        let found = shortcut_line(&search);
        assert!(found.contains("class 2 stands out"), "{found}");
        assert!(found.contains("sends 98% of clean images"), "{found}");
        assert!(found.contains("the next class, 3, from 40%"), "{found}");
        assert!(found.contains("3% of the pixel range"), "{found}");
        search.target = None;
        search.found_by = None;
        let none = shortcut_line(&search);
        assert!(none.contains("no class stood out"), "{none}");
        assert!(none.contains("the easiest, class 2, from 98%"), "{none}");
    }

    #[test]
    fn warnings_are_listed_escaped_and_absent_when_there_are_none() {
        assert_eq!(warnings_list(&[]), "");
        let list = warnings_list(&["accuracy fell <5 points> & more".to_string()]);
        assert!(list.contains("<h2>Warnings</h2>"), "{list}");
        assert!(
            list.contains("<li>accuracy fell &lt;5 points&gt; &amp; more</li>"),
            "{list}"
        );
    }

    #[test]
    fn a_layer_ranked_relative_to_the_shortcut_says_so_and_shows_both_scores() {
        let mut layer = LayerReport {
            name: "features.0".into(),
            weight_shape: vec![2, 1, 3, 3],
            grouped_parameters: vec![],
            is_classifier: false,
            width: 2,
            benign_salience: vec![0.5, 1.5],
            normalized_salience: vec![0.5, 1.5],
            shortcut_salience: Some(vec![0.25, 0.0]),
            relative_salience: Some(vec![0.25, 1500.0]),
            norm_before: vec![1.0, 1.0],
            norm_after: vec![0.0, 1.0],
            flagged: vec![0],
            pruned: vec![0],
            suspect_weights: 0,
            pruned_weights: 0,
        };
        let ranked = salience_figure(&layer);
        assert!(ranked.contains("1 flagged (ranked relative to the shortcut's salience)"));
        // The shortcut's salience over its layer mean (0.125), like the bars.
        assert!(
            ranked.contains("<title>neuron 0: 0.5000, shortcut 2.0000, ranked by 0.2500</title>"),
            "{ranked}"
        );
        layer.shortcut_salience = None;
        layer.relative_salience = None;
        let plain = salience_figure(&layer);
        assert!(!plain.contains("shortcut"), "{plain}");
        assert!(plain.contains("<title>neuron 0: 0.5000</title>"));
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
