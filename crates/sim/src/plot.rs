//! The report as a picture: an SVG with two panels, migrations completed over simulated
//! time, and the time each host took to drain.

use crate::scenario::Report;

const W: f64 = 800.0;
const H: f64 = 260.0;
const PAD: f64 = 50.0;

/// A panel: a polyline (or dots) of `points` scaled into a `W` x `H` box at `top`.
fn panel(out: &mut String, top: f64, title: &str, x_label: &str, y_label: &str, points: &[(f64, f64)], dots: bool) {
    let max_x = points.iter().map(|p| p.0).fold(0.0f64, f64::max).max(1e-9);
    let max_y = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9);
    let sx = |x: f64| PAD + x / max_x * (W - 2.0 * PAD);
    let sy = |y: f64| top + H - PAD + -(y / max_y) * (H - 2.0 * PAD);
    out.push_str(&format!("<text x=\"{PAD}\" y=\"{}\" font-size=\"14\" font-family=\"sans-serif\">{}</text>\n", top + 20.0, escape(title)));
    out.push_str(&format!(
        "<line x1=\"{PAD}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"black\"/><line x1=\"{PAD}\" y1=\"{y0}\" x2=\"{PAD}\" y2=\"{yt}\" stroke=\"black\"/>\n",
        y0 = top + H - PAD,
        x1 = W - PAD,
        yt = top + PAD
    ));
    out.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" font-family=\"sans-serif\" text-anchor=\"end\">{} (max {max_x:.0})</text>\n",
        W - PAD,
        top + H - PAD + 30.0,
        escape(x_label)
    ));
    out.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" font-family=\"sans-serif\">{} (max {max_y:.1})</text>\n",
        PAD + 5.0,
        top + PAD - 5.0,
        escape(y_label)
    ));
    if dots {
        for (x, y) in points {
            out.push_str(&format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"steelblue\"/>\n", sx(*x), sy(*y)));
        }
    } else {
        let path: Vec<String> = points.iter().map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y))).collect();
        out.push_str(&format!("<polyline fill=\"none\" stroke=\"steelblue\" stroke-width=\"2\" points=\"{}\"/>\n", path.join(" ")));
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The SVG of `report`.
pub fn svg(report: &Report) -> String {
    let mut out =
        format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\">\n", 2.0 * H, 2.0 * H);
    out.push_str("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    #[allow(clippy::cast_precision_loss)]
    let series: Vec<(f64, f64)> = report.series.iter().map(|(t, n)| (t / 3600.0, *n as f64)).collect();
    let title = format!(
        "{:?}: {} hosts, {} VMs: migrations completed over simulated time",
        report.config.scenario, report.config.hosts, report.config.vms
    );
    panel(&mut out, 0.0, &title, "simulated hours", "migrations", &series, false);
    #[allow(clippy::cast_precision_loss)]
    let drains: Vec<(f64, f64)> = report.drains.iter().enumerate().map(|(i, d)| ((i + 1) as f64, d.time_s)).collect();
    panel(&mut out, H, "time to drain each host", "host, in maintenance order", "simulated seconds", &drains, true);
    out.push_str("</svg>\n");
    out
}

/// The SVG of a day of load changes: the imbalance (spread of CPU use between the
/// hottest and the coolest host) each simulated minute, and the moves in each hour.
pub fn day_svg(report: &crate::DayReport) -> String {
    let mut out =
        format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\">\n", 2.0 * H, 2.0 * H);
    out.push_str("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let spread: Vec<(f64, f64)> = report.load.iter().map(|l| (l.at_s / 3600.0, l.spread)).collect();
    let c = &report.config;
    let title = format!(
        "day of load changes: {} hosts, {} VMs, balancing {:?} (threshold {}): CPU use spread, hottest - coolest host",
        c.cluster.hosts, c.cluster.vms, c.balance.level, c.balance.threshold
    );
    panel(&mut out, 0.0, &title, "simulated hours", "spread", &spread, false);
    #[allow(clippy::cast_precision_loss)]
    let moves: Vec<(f64, f64)> = report.moves_per_hour.iter().enumerate().map(|(h, n)| (h as f64, *n as f64)).collect();
    panel(&mut out, H, "moves started per simulated hour", "hour", "moves", &moves, true);
    out.push_str("</svg>\n");
    out
}
