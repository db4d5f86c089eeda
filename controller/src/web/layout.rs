//! The page shell (head, stylesheet, navigation) and the small pieces every page uses: badges,
//! ages, sizes, progress bars. Every value reaches the HTML through maud, which escapes it.

use std::time::Duration;

use maud::{html, Markup, PreEscaped, DOCTYPE};

/// The stylesheet, inline (the pages load nothing else).
const STYLE: &str = r#"
:root{--bg:#111217;--panel:#181b1f;--panel2:#1f2228;--border:#2c3235;--text:#d8d9da;--muted:#8e9297;
--ok:#73bf69;--warn:#fade2a;--bad:#f2495c;--info:#5794f2;--accent:#ff9830;--purple:#b877d9}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--text);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
a{color:var(--info);text-decoration:none}a:hover{text-decoration:underline}
header{display:flex;align-items:center;gap:28px;padding:0 20px;height:48px;background:var(--panel);
border-bottom:1px solid var(--border)}
.brand{font-weight:700;font-size:16px;color:#fff;letter-spacing:.3px}
.brand span{color:var(--accent)}
nav{display:flex;gap:2px;flex:1}
nav a{color:var(--muted);padding:13px 12px;border-bottom:2px solid transparent}
nav a:hover{color:#fff;text-decoration:none}
nav a.active{color:#fff;border-bottom-color:var(--accent)}
header form{margin:0}
button{background:var(--panel2);color:var(--text);border:1px solid var(--border);border-radius:3px;
padding:5px 12px;font:inherit;cursor:pointer}
button:hover{border-color:var(--muted)}
button.primary{background:#3d71d9;border-color:#3d71d9;color:#fff;width:100%;padding:8px}
main{padding:20px;max-width:1440px;margin:0 auto}
h1{font-size:20px;font-weight:500;margin:4px 0 16px;color:#fff}
h1 small{color:var(--muted);font-size:14px;margin-left:10px}
h2{font-size:14px;font-weight:600;margin:0 0 10px;color:#fff}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:12px;margin-bottom:14px}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:14px;margin-bottom:14px}
.panel{background:var(--panel);border:1px solid var(--border);border-radius:4px;padding:12px 16px;
margin-bottom:14px;overflow-x:auto}
.cols .panel,.grid .panel{margin-bottom:0}
.stat .label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.4px}
.stat .value{font-size:34px;font-weight:600;line-height:1.2;color:#fff}
.stat.ok .value{color:var(--ok)}.stat.warn .value{color:var(--warn)}.stat.bad .value{color:var(--bad)}
.stat.info .value{color:var(--info)}
table{width:100%;border-collapse:collapse}
th{text-align:left;color:var(--muted);font-weight:500;font-size:12px;border-bottom:1px solid var(--border);
padding:6px 8px;white-space:nowrap}
td{padding:6px 8px;border-bottom:1px solid #22252b;vertical-align:top;unicode-bidi:isolate}
tr:hover td{background:#1c1f24}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.mono,td.num,td a{white-space:nowrap}
.muted{color:var(--muted)}
.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12.5px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;
white-space:nowrap}
.b-ok{background:rgba(115,191,105,.15);color:var(--ok)}
.b-warn{background:rgba(250,222,42,.13);color:var(--warn)}
.b-bad{background:rgba(242,73,92,.15);color:var(--bad)}
.b-info{background:rgba(87,148,242,.15);color:var(--info)}
.b-muted{background:#2a2d33;color:var(--muted)}
.chip{display:inline-block;background:var(--panel2);border:1px solid var(--border);border-radius:3px;
padding:0 6px;margin:1px 3px 1px 0;font-size:12px}
.bar{display:flex;height:10px;background:#262a31;border-radius:5px;overflow:hidden;min-width:160px}
.bar span{display:block;height:100%}
.s-ok{background:var(--ok)}.s-bad{background:var(--bad)}.s-warn{background:var(--warn)}
.s-info{background:var(--info)}.s-muted{background:#4a4f57}
.legend{font-size:12px;color:var(--muted);margin-top:4px}
.legend i{display:inline-block;width:9px;height:9px;border-radius:2px;margin:0 4px 0 10px}
.legend i:first-child{margin-left:0}
ul.reasons{margin:0;padding-left:16px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}
dl.facts dt{color:var(--muted)}dl.facts dd{margin:0;unicode-bidi:isolate}
figure.chart{margin:0}
figure.chart figcaption{display:flex;justify-content:space-between;margin-bottom:4px}
.chart-title{font-weight:600;color:#fff}.chart-latest{color:var(--muted)}
figure.chart svg{width:100%;height:auto;display:block}
svg .grid{stroke:#2c3235;stroke-width:1}
svg .axis{fill:var(--muted);font-size:10px}
svg .line{fill:none;stroke-width:2;stroke-linejoin:round}
svg .line.ok{stroke:var(--ok)}svg .line.warn{stroke:var(--warn)}svg .line.bad{stroke:var(--bad)}
svg .line.info{stroke:var(--info)}
svg.spark{width:120px;height:24px;display:block}svg.spark .line{stroke-width:1.5}
details summary{cursor:pointer;color:var(--muted)}
.login{max-width:380px;margin:12vh auto}
.login input{width:100%;padding:8px;margin:8px 0 14px;background:var(--bg);color:var(--text);
border:1px solid var(--border);border-radius:3px;font:inherit}
.error{color:var(--bad);margin:0 0 10px}
footer{color:var(--muted);font-size:12px;padding:0 20px 20px;max-width:1440px;margin:0 auto}
"#;

/// The sections of the navigation: (path, title).
const NAV: [(&str, &str); 7] = [
    ("/ui/", "Overview"),
    ("/ui/nodes", "Nodes"),
    ("/ui/drives", "Drives"),
    ("/ui/overlay", "Overlay"),
    ("/ui/rollouts", "Rollouts"),
    ("/ui/backups", "Backups"),
    ("/ui/events", "Events"),
];

/// A whole page: `active` is the navigation entry to highlight.
pub fn page(title: &str, active: &str, generated: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · shoal" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    div.brand { "shoal" span { "." } }
                    nav {
                        @for (href, name) in NAV {
                            a href=(href) class=[(href == active).then_some("active")] { (name) }
                        }
                    }
                    form method="post" action="/ui/logout" {
                        button type="submit" { "Log out" }
                    }
                }
                main { (body) }
                footer { "Rendered " (generated) " by the controller. Reload for fresh figures." }
            }
        }
    }
}

/// The login page (outside the shell: no navigation before a session).
pub fn login(error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Log in · shoal" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                div.login.panel {
                    div.brand style="margin:6px 0 14px" { "shoal" span { "." } " fleet" }
                    @if let Some(e) = error { p.error { (e) } }
                    form method="post" action="/ui/login" {
                        label for="token" { "Admin token" }
                        input #token type="password" name="token" autocomplete="current-password"
                            required autofocus;
                        button.primary type="submit" { "Log in" }
                    }
                    p.muted style="font-size:12px;margin:12px 0 0" {
                        "The token is the " code { "token" } " line of the controller's "
                        code { "admin.conf" } "."
                    }
                }
            }
        }
    }
}

/// The badge class for a status word.
pub fn tone(word: &str) -> &'static str {
    match word {
        "up" | "ok" | "passed" | "done" | "succeeded" | "direct" | "prepared" | "connected" => "ok",
        "warning" | "paused" | "relay" | "awaiting-approval" | "never" | "pending"
        | "upgrading" | "rolling_back" | "preparing" => "warn",
        "down" | "failing" | "failed" | "aborted" | "missing" | "prepare-failed" | "unreadable" => {
            "bad"
        }
        "running" => "info",
        _ => "muted",
    }
}

/// A status word as a coloured badge.
pub fn badge(word: &str) -> Markup {
    html! { span class=(format!("badge b-{}", tone(word))) { (word) } }
}

/// How long ago `then_ms` was, at `now_ms`: `4s`, `3m 12s`, `2h 5m`, `3d 4h`.
pub fn ago(now_ms: u64, then_ms: u64) -> String {
    let secs = now_ms.saturating_sub(then_ms) / 1000;
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A byte count in binary units: `512 B`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A duration for people: `3h 12m`.
pub fn duration(d: Duration) -> String {
    ago(d.as_millis() as u64, 0)
}

/// A stat panel: a label and a big number, coloured by `class` (`ok`, `warn`, `bad`, `info`, or
/// empty), with the element id `id`.
pub fn stat(label: &str, value: usize, class: &str, href: Option<&str>, id: &str) -> Markup {
    html! {
        div id=(id) class=(format!("panel stat {class}")) {
            div.label { (label) }
            div.value {
                @if let Some(h) = href { a href=(h) style="color:inherit" { (value) } } @else { (value) }
            }
        }
    }
}

/// A smaller stat panel holding text.
pub fn stat_text(label: &str, value: &str) -> Markup {
    html! {
        div.panel.stat {
            div.label { (label) }
            div.value style="font-size:20px" { (value) }
        }
    }
}

/// A stacked bar: `(count, class, name)` parts of `total`, with a legend.
pub fn stacked_bar(total: u32, parts: &[(u32, &str, &str)]) -> Markup {
    let total = total.max(1) as f64;
    html! {
        div.bar role="img" aria-label=(parts.iter().map(|(n, _, name)| format!("{n} {name}"))
            .collect::<Vec<_>>().join(", ")) {
            @for (n, class, name) in parts {
                @if *n > 0 {
                    span class=(format!("s-{class}")) title=(format!("{n} {name}"))
                        style=(format!("width:{:.2}%", *n as f64 / total * 100.0)) {}
                }
            }
        }
        div.legend {
            @for (n, class, name) in parts {
                i class=(format!("s-{class}")) {} (name) " " (n)
            }
        }
    }
}

/// A usage bar for one fraction (0–100 %), coloured by how full it is.
pub fn usage_bar(percent: f64) -> Markup {
    let class = if percent > 90.0 {
        "bad"
    } else if percent > 75.0 {
        "warn"
    } else {
        "ok"
    };
    let p = percent.clamp(0.0, 100.0);
    html! {
        div.bar title=(format!("{percent:.0}%")) {
            span class=(format!("s-{class}")) style=(format!("width:{p:.1}%")) {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_sizes_read_as_people_write_them() {
        assert_eq!(ago(5_000, 1_000), "4s");
        assert_eq!(ago(1_000, 5_000), "0s", "a clock ahead is not negative");
        assert_eq!(ago(192_000, 0), "3m 12s");
        assert_eq!(ago(7_500_000, 0), "2h 5m");
        assert_eq!(ago(3 * 86_400_000 + 4 * 3_600_000, 0), "3d 4h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn page_text_is_escaped() {
        let html = page(
            "<x>",
            "/ui/",
            "now",
            html! { p { ("<script>alert(1)</script>") } },
        )
        .into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("<title>&lt;x&gt; · shoal</title>"));
    }
}
