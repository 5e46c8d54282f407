//! The image and disk commands: `images`, `images:export`, `gc`, `info`. Reads through the
//! store and the image store; collection goes through `deploy` (it decides what is kept).

use std::collections::HashMap;
use std::io::{self, Write};

use anyhow::Context;
use serde::Serialize;

use super::Handles;
use crate::disk::{human, usage};
use crate::progress::Progress as Out;

/// A release using an image.
#[derive(Serialize)]
struct User {
    app: String,
    version: i64,
    status: &'static str,
}

#[derive(Serialize)]
struct ImageRow {
    digest: String,
    tags: Vec<String>,
    size: u64,
    /// Its layer digests, bottom-most first.
    layers: Vec<String>,
    used_by: Vec<User>,
    /// Whether `gc` keeps it.
    kept: bool,
}

pub async fn images(d: &Handles, json: bool, out: &Out) -> anyhow::Result<()> {
    let mut users: HashMap<String, Vec<User>> = HashMap::new();
    for app in d.store.apps().await? {
        for r in d.store.releases(&app.name).await? {
            users.entry(r.image).or_default().push(User {
                app: app.name.clone(),
                version: r.version,
                status: r.status.as_str(),
            });
        }
    }
    let kept = d.deployer.kept_images().await?;
    let store = d.deployer.builder().images.clone();
    let mut rows: Vec<ImageRow> = tokio::task::spawn_blocking(move || store.images())
        .await
        .expect("images task")?
        .into_iter()
        .map(|i| ImageRow {
            kept: !i.tags.is_empty() || kept.contains_key(&i.digest),
            used_by: users.remove(&i.digest).unwrap_or_default(),
            digest: i.digest,
            tags: i.tags,
            size: i.size,
            layers: i.layers,
        })
        .collect();
    rows.sort_by(|a, b| {
        (a.tags.is_empty(), &a.tags, &a.digest).cmp(&(b.tags.is_empty(), &b.tags, &b.digest))
    });
    if json {
        return super::handlers::print_json(out, &rows).await;
    }
    out.line(format!(
        "{:<32} {:<19} {:>8}  USED BY",
        "NAME", "DIGEST", "SIZE"
    ))
    .await;
    for row in rows {
        let name = match row.used_by.first() {
            _ if !row.tags.is_empty() => row.tags.join(", "),
            Some(u) => format!("{}:v{}", u.app, u.version),
            None => "-".to_string(),
        };
        let mut by: Vec<String> = row
            .used_by
            .iter()
            .map(|u| format!("{} v{} ({})", u.app, u.version, u.status))
            .collect();
        if by.is_empty() {
            by.push(
                if row.kept {
                    "-"
                } else {
                    "nothing (gc removes it)"
                }
                .to_string(),
            );
        }
        out.line(format!(
            "{name:<32} {:<19} {:>8}  {}",
            &row.digest[..19.min(row.digest.len())],
            human(row.size),
            by.join(", ")
        ))
        .await;
    }
    Ok(())
}

/// Which image `IMAGE` names, and the tag to give it in the archive: a tag in the store,
/// `APP:vN` (a release), `APP` (its live release) or a digest (`sha256:` and at least 12 hex
/// digits, as `images` shows them).
async fn find_image(d: &Handles, image: &str) -> anyhow::Result<(String, Option<String>)> {
    let store = &d.deployer.builder().images;
    if let Some(digest) = store.resolve(image) {
        return Ok((digest, Some(image.to_string())));
    }
    let (app, version) = match image.split_once(":v") {
        Some((app, v)) => (app, v.parse::<i64>().ok()),
        None => (image, None),
    };
    if crate::app::validate(app).is_ok() && d.store.app_exists(app).await? {
        let release = match version {
            Some(v) => d.store.release(app, v).await?,
            None => d.store.live_release(app).await?,
        }
        .with_context(|| format!("{image} names no release — see `berth releases {app}`"))?;
        return Ok((release.image, Some(format!("{app}:v{}", release.version))));
    }
    if let Some(hex) = image.strip_prefix("sha256:").filter(|h| h.len() >= 12) {
        let listed = store.images()?;
        let mut found = listed.iter().filter(|i| i.digest[7..].starts_with(hex));
        if let (Some(one), None) = (found.next(), found.next()) {
            return Ok((one.digest.clone(), None));
        }
    }
    anyhow::bail!("no image {image:?} — name a tag, APP:vN or a digest from `berth images`")
}

pub async fn export(d: &Handles, image: &str, out: &Out) -> anyhow::Result<()> {
    let store = d.deployer.builder().images.clone();
    // Collection must not remove the image, or the export's scratch, meanwhile.
    let _reading = store.writing().await;
    let (digest, name) = find_image(d, image).await?;
    let sink = out.clone();
    tokio::task::spawn_blocking(move || {
        let writer = io::BufWriter::with_capacity(1 << 16, DataWriter(sink));
        store.export(&digest, name.as_deref(), writer)
    })
    .await
    .expect("export task")?;
    Ok(())
}

/// Bytes for the client's stdout, in chunks; fails once nobody listens.
struct DataWriter(Out);

impl Write for DataWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.is_closed() || !self.0.blocking_data(buf) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub async fn gc(d: &Handles, json: bool, out: &Out) -> anyhow::Result<()> {
    let report = d.deployer.collect().await?;
    if json {
        return super::handlers::print_json(out, &report).await;
    }
    let c = &report.collected;
    out.line(format!(
        "Removed {} image(s), {} layer(s), {} Dockerfile step cache entr{} and {} buildpack cache entr{}; freed {} ({} → {})",
        c.images,
        c.layers,
        c.step_cache_entries,
        if c.step_cache_entries == 1 { "y" } else { "ies" },
        report.buildpack_cache_entries,
        if report.buildpack_cache_entries == 1 { "y" } else { "ies" },
        human(report.bytes_before.saturating_sub(report.bytes_after)),
        human(report.bytes_before),
        human(report.bytes_after),
    ))
    .await;
    Ok(())
}

#[derive(Serialize)]
struct Info {
    version: &'static str,
    data_dir: String,
    images_bytes: u64,
    images: usize,
    build_caches_bytes: u64,
    logs_bytes: u64,
    keep_releases: usize,
}

pub async fn info(d: &Handles, json: bool, out: &Out) -> anyhow::Result<()> {
    let (paths, store) = (d.paths.clone(), d.deployer.builder().images.clone());
    let keep_releases = d.deployer.keep_releases();
    let info = tokio::task::spawn_blocking(move || {
        Ok::<_, anyhow::Error>(Info {
            version: env!("CARGO_PKG_VERSION"),
            data_dir: paths.root().display().to_string(),
            images_bytes: usage(&paths.images()),
            images: store.images()?.len(),
            build_caches_bytes: usage(&paths.caches()),
            logs_bytes: usage(&paths.logs()),
            keep_releases,
        })
    })
    .await
    .expect("info task")?;
    if json {
        return super::handlers::print_json(out, &info).await;
    }
    for line in [
        format!("berth {}", info.version),
        format!("data dir:      {}", info.data_dir),
        format!(
            "images:        {} ({} images; see `berth images`)",
            human(info.images_bytes),
            info.images
        ),
        format!(
            "build caches:  {} (buildpack caches; cached Dockerfile steps are layers, under images)",
            human(info.build_caches_bytes)
        ),
        format!("logs:          {}", human(info.logs_bytes)),
        format!(
            "kept releases: the last {} of each app (`berth server --keep-releases`)",
            info.keep_releases
        ),
    ] {
        out.line(line).await;
    }
    Ok(())
}
