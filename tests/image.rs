//! The image store on real files, and (slow) the stack images built with mmdebstrap and the
//! python buildpack run inside them for real.

use berth::image::stack::{ensure_stacks, STACKS};
use berth::image::{Image, ImageConfig, ImageError, ImageStore};
use sha2::{Digest, Sha256};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Instant;

#[path = "support/registry.rs"]
mod registry;
#[path = "support/stacks.rs"]
mod stacks;

fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h
}

/// A layer tar with a directory, an owned file, a symlink, a hard link and a device node.
fn sample_tar(path: &Path) {
    use tar::EntryType::*;
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    let mut dir = header(Directory, 0o750, 0, 0);
    b.append_data(&mut dir, "./etc/", std::io::empty()).unwrap();
    let mut file = header(Regular, 0o640, 1234, 5);
    b.append_data(&mut file, "./etc/secret", &b"hello"[..])
        .unwrap();
    let mut link = header(Symlink, 0o777, 0, 0);
    b.append_link(&mut link, "etc/alias", "secret").unwrap();
    let mut hard = header(Link, 0o640, 1234, 0);
    b.append_link(&mut hard, "etc/hard", "./etc/secret")
        .unwrap();
    let mut dev = header(Char, 0o666, 0, 0);
    dev.set_device_major(1).unwrap();
    dev.set_device_minor(3).unwrap();
    b.append_data(&mut dev, "dev/null", std::io::empty())
        .unwrap();
    b.finish().unwrap();
}

/// The names in a tar, hard links as `name => target`.
fn tar_names(bytes: &[u8]) -> Vec<String> {
    let mut archive = tar::Archive::new(bytes);
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        assert_eq!(entry.header().mtime().unwrap(), 0);
        let name = entry.path().unwrap().display().to_string();
        if entry.header().entry_type() == tar::EntryType::Link {
            names.push(format!(
                "{name} => {}",
                entry.link_name().unwrap().unwrap().display()
            ));
        } else {
            names.push(name);
        }
    }
    names
}

#[test]
fn import_layer_tar_keeps_one_extracted_copy_and_regenerates_its_tar() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("images")).unwrap();
    let tar_path = tmp.path().join("layer.tar");
    sample_tar(&tar_path);

    let layer = store.import_layer_tar(&tar_path).unwrap();
    // Its digest is that of its canonical tar, which the store regenerates on demand.
    let tar = store.write_layer_tar(&layer.digest, Vec::new()).unwrap();
    let hex = hex::encode(Sha256::digest(&tar));
    assert_eq!(layer.digest, format!("sha256:{hex}"));
    assert_eq!(
        tar_names(&tar),
        ["etc", "etc/alias", "etc/hard", "etc/secret => etc/hard"]
    );
    let root = tmp.path().join("images");
    assert_eq!(
        fs::read_dir(root.join("blobs/sha256")).unwrap().count(),
        0,
        "the tar itself is not kept"
    );
    assert_eq!(
        fs::read_to_string(root.join("layers").join(&hex)).unwrap(),
        tar.len().to_string()
    );
    assert_eq!(layer.dir, root.join("l").join(&hex[..12]));
    assert!(root.join("oci-layout").is_file());

    // The canonical tar imports as the same layer.
    fs::write(&tar_path, &tar).unwrap();
    assert_eq!(store.import_layer_tar(&tar_path).unwrap(), layer);

    let secret = fs::metadata(layer.dir.join("etc/secret")).unwrap();
    assert_eq!(secret.mode() & 0o7777, 0o640);
    assert_eq!((secret.uid(), secret.gid()), (1234, 1234));
    assert_eq!(fs::read(layer.dir.join("etc/secret")).unwrap(), b"hello");
    assert_eq!(
        fs::metadata(layer.dir.join("etc")).unwrap().mode() & 0o7777,
        0o750
    );
    assert_eq!(
        fs::read_link(layer.dir.join("etc/alias")).unwrap(),
        Path::new("secret")
    );
    assert_eq!(
        fs::metadata(layer.dir.join("etc/hard")).unwrap().ino(),
        secret.ino()
    );
    assert!(
        fs::symlink_metadata(layer.dir.join("dev/null")).is_err(),
        "device nodes are skipped"
    );

    // Files changed on disk no longer give the digest: export refuses the layer.
    fs::write(layer.dir.join("etc/secret"), "HELLO").unwrap();
    assert!(matches!(
        store.write_layer_tar(&layer.digest, Vec::new()),
        Err(ImageError::Corrupt { .. })
    ));
}

/// A tar entry named `name`, written raw: the tar crate refuses to write `..` itself.
fn raw_tar(path: &Path, name: &[u8], kind: tar::EntryType, link: &[u8]) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    let data: &[u8] = if kind == tar::EntryType::Regular {
        b"owned"
    } else {
        b""
    };
    h.set_size(data.len() as u64);
    h.set_cksum();
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    b.append(&h, data).unwrap();
    b.finish().unwrap();
}

#[test]
fn import_refuses_entries_escaping_the_root() {
    let cases: &[(&str, &[u8], tar::EntryType, &[u8])] = &[
        (
            "file above the root",
            b"../evil",
            tar::EntryType::Regular,
            b"",
        ),
        (
            "file deep above",
            b"a/../../evil",
            tar::EntryType::Regular,
            b"",
        ),
        (
            "hard link to outside",
            b"inside",
            tar::EntryType::Link,
            b"../../etc/passwd",
        ),
    ];
    for (what, name, kind, link) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store/images");
        let store = ImageStore::open(&root).unwrap();
        let tar_path = tmp.path().join("bad.tar");
        raw_tar(&tar_path, name, *kind, link);
        match store.import_layer_tar(&tar_path) {
            Err(e @ ImageError::UnsafeEntry { .. }) => {
                assert!(e.to_string().contains("refusing"), "{what}: {e}")
            }
            other => panic!("{what}: expected UnsafeEntry, got {other:?}"),
        }
        assert!(!tmp.path().join("store/evil").exists(), "{what}");
        assert_eq!(fs::read_dir(root.join("l")).unwrap().count(), 0, "{what}");
        assert_eq!(
            fs::read_dir(root.join("blobs/sha256")).unwrap().count(),
            0,
            "{what}: nothing stored"
        );
    }
}

fn sample_app(dir: &Path, mtime_seed: u64) {
    fs::create_dir_all(dir.join("src/pkg")).unwrap();
    fs::write(dir.join("Procfile"), "web: python app.py\n").unwrap();
    fs::write(dir.join("src/pkg/mod.py"), "x = 1\n").unwrap();
    fs::write(dir.join("run.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(dir.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("src/pkg/mod.py", dir.join("link.py")).unwrap();
    fs::hard_link(dir.join("Procfile"), dir.join("Procfile.bak")).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    // Different modification times must not change the digest.
    let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(mtime_seed);
    fs::File::options()
        .write(true)
        .open(dir.join("src/pkg/mod.py"))
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn layer_from_dir_is_deterministic_and_moves_the_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("images")).unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    sample_app(&a, 1_000);
    sample_app(&b, 2_000_000);
    sample_app(&c, 1_000);
    fs::write(c.join("src/pkg/mod.py"), "x = 2\n").unwrap();

    let la = store.layer_from_dir(&a, "app").unwrap();
    assert!(!a.exists(), "the source dir is moved, not copied");
    assert_eq!(
        fs::read_to_string(la.dir.join("app/src/pkg/mod.py")).unwrap(),
        "x = 1\n"
    );
    assert_eq!(
        fs::read_link(la.dir.join("app/link.py")).unwrap(),
        Path::new("src/pkg/mod.py")
    );
    let lb = store.layer_from_dir(&b, "app").unwrap();
    assert_eq!(la, lb, "equal dirs give equal layers");
    assert!(!b.exists(), "a duplicate source dir is consumed too");
    let lc = store.layer_from_dir(&c, "app").unwrap();
    assert_ne!(la.digest, lc.digest, "different content, different digest");

    // Its tar holds app/… with mtime 0, the hard link kept as a link.
    let names = tar_names(&store.write_layer_tar(&la.digest, Vec::new()).unwrap());
    assert_eq!(
        names,
        [
            "app",
            "app/Procfile",
            "app/Procfile.bak => app/Procfile",
            "app/link.py",
            "app/run.sh",
            "app/src",
            "app/src/pkg",
            "app/src/pkg/mod.py"
        ]
    );
    assert!(matches!(
        store.layer_from_dir(tmp.path(), "../x"),
        Err(ImageError::BadPrefix(_))
    ));
}

#[test]
fn put_image_round_trips_with_layers_top_most_first() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    let tar_path = tmp.path().join("base.tar");
    sample_tar(&tar_path);
    let base = store.import_layer_tar(&tar_path).unwrap();
    let app_dir = tmp.path().join("app");
    sample_app(&app_dir, 0);
    let app = store.layer_from_dir(&app_dir, "app").unwrap();
    let config = ImageConfig {
        env: vec!["PATH=/usr/bin:/bin".into(), "LANG=C.UTF-8".into()],
        working_dir: "/app".into(),
        cmd: vec!["python".into(), "app.py".into()],
        ..ImageConfig::default()
    };

    let digest = store
        .put_image(&[base.clone(), app.clone()], &config)
        .unwrap();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );
    assert_eq!(
        store
            .put_image(&[base.clone(), app.clone()], &config)
            .unwrap(),
        digest,
        "same image, same digest"
    );
    let image: Image = store.image(&digest).unwrap();
    assert_eq!(image.digest, digest);
    assert_eq!(image.config, config);
    assert_eq!(image.layer_dirs(), vec![app.dir.clone(), base.dir.clone()]);
    assert_eq!(image.layers, vec![base.clone(), app.clone()]);

    // The OCI config lists diff_ids bottom-most first.
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(root.join("blobs/sha256").join(&digest[7..])).unwrap())
            .unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let oci: serde_json::Value = serde_json::from_slice(
        &fs::read(root.join("blobs/sha256").join(&config_digest[7..])).unwrap(),
    )
    .unwrap();
    assert_eq!(
        oci["rootfs"]["diff_ids"],
        serde_json::json!([base.digest, app.digest])
    );
    assert_eq!(oci["config"]["WorkingDir"], "/app");

    // Tags, with a `/` in the name; index.json follows them.
    assert_eq!(store.resolve("web/app"), None);
    store.tag("web/app", &digest).unwrap();
    assert_eq!(store.resolve("web/app"), Some(digest.clone()));
    let index = fs::read_to_string(root.join("index.json")).unwrap();
    assert!(
        index.contains(&digest) && index.contains("web/app"),
        "{index}"
    );
    assert!(store
        .tag("other", &format!("sha256:{}", "0".repeat(64)))
        .is_err());
    assert!(matches!(
        store.tag("..", &digest),
        Err(ImageError::BadName(_))
    ));

    // A layer lost from disk is an error, not an empty layer.
    fs::remove_dir_all(&base.dir).unwrap();
    assert!(matches!(
        store.image(&digest),
        Err(ImageError::NotFound { .. })
    ));
    assert!(matches!(
        store.image(&format!("sha256:{}", "a".repeat(64))),
        Err(ImageError::NotFound { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Slow: real stacks from the Debian mirror, real pip from PyPI.

/// True if the slow test can run; under CI=true a missing prerequisite fails instead.
fn slow_prerequisites() -> bool {
    prerequisites_met(
        "slow stack test",
        &["mmdebstrap", "unshare", "mount", "chroot"],
    )
}

/// Returns false (test skipped) when root or one of `tools` is missing outside CI; panics
/// under CI=true.
fn prerequisites_met(test: &str, tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test} needs: {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: missing prerequisites fail)");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

const HOST_CA: &str = "/etc/ssl/certs/ca-certificates.crt";
const IMAGE_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Mounts `image` as an overlay in a private mount namespace (`unshare -m`: every mount goes
/// away with the namespace, even when something fails), binds the host's resolv.conf and CA
/// bundle plus `binds` (host dir, path in the image), and runs `cmd` chrooted, with a clean
/// environment. Returns (success, stdout + stderr).
fn run_in_image(
    image: &Image,
    work: &Path,
    binds: &[(&Path, &str)],
    cmd: &[&str],
) -> (bool, String) {
    let lower: Vec<String> = image
        .layer_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    let bind_lines: String = binds
        .iter()
        .map(|(src, dst)| format!("{} {dst}\n", src.display()))
        .collect();
    let script = r#"
        m=$WORK/merged
        mkdir -p "$WORK/upper" "$WORK/work" "$m"
        mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$WORK/upper,workdir=$WORK/work" "$m"
        mount -t proc proc "$m/proc"
        mount --rbind /dev "$m/dev"
        mount --bind /etc/resolv.conf "$m/etc/resolv.conf"
        mount --bind -o ro "$HOST_CA" "$m$IMAGE_CA"
        printf '%s' "$BINDS" | while read -r src dst; do
            mkdir -p "$m$dst"
            mount --bind "$src" "$m$dst"
        done
        exec chroot "$m" /usr/bin/env -i \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            LANG=C.UTF-8 HOME=/root \
            SSL_CERT_FILE="$IMAGE_CA" PIP_CERT="$IMAGE_CA" "$@"
    "#;
    let out: Output = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-euc", script, "sh"])
        .args(cmd)
        .env("WORK", work)
        .env("LOWER", lower.join(":"))
        .env("BINDS", bind_lines)
        .env("HOST_CA", HOST_CA)
        .env("IMAGE_CA", IMAGE_CA)
        .output()
        .expect("unshare runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn buildpacks_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("buildpacks")
}

/// Runs the buildpack runner on `app` in the build stack; returns (success, output).
fn run_buildpacks(
    build: &Image,
    work: &Path,
    app: &Path,
    cache: &Path,
    env: &Path,
    out: &Path,
) -> (bool, String) {
    for d in [cache, env, out] {
        fs::create_dir_all(d).unwrap();
    }
    run_in_image(
        build,
        work,
        &[
            (&buildpacks_dir(), "/buildpacks"),
            (app, "/app"),
            (cache, "/cache"),
            (env, "/env"),
            (out, "/out"),
        ],
        &[
            "sh",
            "/buildpacks/runner.sh",
            "/app",
            "/cache",
            "/env",
            "/out",
        ],
    )
}

#[test]
fn slow_stack_images_build_and_run_the_python_buildpack() {
    if !slow_prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let stack = STACKS[0];
    let started = Instant::now();
    // Built with mmdebstrap once per recipe on this machine (the shared store), linked here.
    stacks::link_into(&stack, &tmp.path().join("images"));
    eprintln!("stacks ready in {:.1} s", started.elapsed().as_secs_f64());
    let store = ImageStore::open(&tmp.path().join("images")).unwrap();

    // Present stacks are not rebuilt.
    let mut again = Vec::new();
    let (build_digest, run_digest) = ensure_stacks(&store, &stack, false, &mut |l: &str| {
        again.push(l.to_string())
    })
    .unwrap();
    assert!(
        again.is_empty(),
        "nothing to build, nothing said: {again:?}"
    );
    assert_eq!(
        store.resolve(&stack.build_tag()),
        Some(build_digest.clone())
    );
    assert_eq!(store.resolve(&stack.run_tag()), Some(run_digest.clone()));

    let build = store.image(&build_digest).unwrap();
    let run = store.image(&run_digest).unwrap();
    for image in [&build, &run] {
        assert_eq!(
            image.config.env,
            [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8"
            ]
        );
        let top = &image.layer_dirs()[0];
        for f in ["etc/resolv.conf", "etc/hosts"] {
            let meta = fs::metadata(top.join(f)).unwrap();
            assert!(meta.is_file() && meta.len() == 0, "{f} is an empty file");
        }
        assert!(top.join("app").is_dir());
        assert_eq!(
            fs::metadata(top.join("tmp")).unwrap().mode() & 0o7777,
            0o1777
        );
    }
    let mut n = 0;
    let mut work = || {
        n += 1;
        tmp.path().join(format!("work{n}"))
    };

    // Python with TLS and venv works in both stacks.
    for image in [&build, &run] {
        let (ok, out) = run_in_image(
            image,
            &work(),
            &[],
            &["python3", "-c", "import ssl, venv; print(1)"],
        );
        assert!(
            ok && out.trim() == "1",
            "python3 in {}: {out}",
            image.digest
        );
    }

    // The python buildpack, for real, from PyPI.
    let app = tmp.path().join("app");
    fs::create_dir_all(&app).unwrap();
    fs::write(app.join("requirements.txt"), "six==1.16.0\n").unwrap();
    fs::write(app.join("Procfile"), "web: python -c 'import six'\n").unwrap();
    let (cache, env, out) = (
        tmp.path().join("cache"),
        tmp.path().join("env"),
        tmp.path().join("out"),
    );
    fs::create_dir_all(&env).unwrap();
    fs::write(env.join("SECRET_TOKEN"), "berth-secret-value-7731").unwrap();
    fs::write(env.join("PIP_DEFAULT_TIMEOUT"), "90").unwrap();
    let started = Instant::now();
    let (ok, output) = run_buildpacks(&build, &work(), &app, &cache, &env, &out);
    eprintln!(
        "{output}\npython buildpack took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(ok, "python buildpack failed:\n{output}");
    for want in [
        "-----> Python app detected",
        "       Installing requirements.txt with pip",
        "Successfully installed six-1.16.0",
    ] {
        assert!(output.contains(want), "missing {want:?} in:\n{output}");
    }
    assert!(
        !output.contains("berth-secret-value-7731"),
        "config values are never printed"
    );
    assert!(app
        .join(format!(
            ".venv/lib/python{}/site-packages/six.py",
            stack.python
        ))
        .is_file());
    assert!(fs::read_to_string(app.join(".profile.d/python.sh"))
        .unwrap()
        .contains("/app/.venv/bin"));
    assert_eq!(
        fs::read_to_string(out.join("buildpacks")).unwrap(),
        "python\n"
    );
    let release = fs::read_to_string(out.join("release.yml")).unwrap();
    assert_eq!(
        berth::build::release::default_process_types(&release),
        Ok(vec![])
    );
    assert!(
        cache.join("python/pip").is_dir(),
        "pip's cache lives in CACHE_DIR"
    );

    // The next build with the same requirements reuses the cached venv, without pip.
    let again = tmp.path().join("again");
    fs::create_dir_all(&again).unwrap();
    fs::copy(app.join("requirements.txt"), again.join("requirements.txt")).unwrap();
    let started = Instant::now();
    let (ok, output) = run_buildpacks(
        &build,
        &work(),
        &again,
        &cache,
        &env,
        &tmp.path().join("out3"),
    );
    let secs = started.elapsed().as_secs_f64();
    assert!(ok, "{output}");
    assert!(
        output.contains("Reusing the cached virtualenv (requirements.txt unchanged)"),
        "{output}"
    );
    assert!(!output.contains("pip"), "pip does not run: {output}");
    // No copy: a link into the cache, and the venv declared as a layer berth reuses by key.
    assert_eq!(
        fs::read_link(again.join(".venv")).unwrap(),
        Path::new("/cache/python/venv")
    );
    let layers = fs::read_to_string(tmp.path().join("out3/layers")).unwrap();
    assert!(layers.starts_with(".venv "), "{layers:?}");
    assert_eq!(
        layers,
        fs::read_to_string(out.join("layers")).unwrap(),
        "the same key as the build that filled the cache"
    );
    eprintln!("warm python buildpack took {secs:.2} s");

    // The venv built on the build stack runs on the run stack, as an app image.
    let app_layer = store.layer_from_dir(&app, "app").unwrap();
    let app_image = store
        .put_image(
            &[run.layers.clone(), vec![app_layer]].concat(),
            &ImageConfig {
                env: run.config.env.clone(),
                working_dir: "/app".into(),
                cmd: vec![],
                ..ImageConfig::default()
            },
        )
        .unwrap();
    let app_image = store.image(&app_image).unwrap();
    assert_eq!(app_image.layer_dirs().len(), 2);
    let (ok, output) = run_in_image(
        &app_image,
        &work(),
        &[],
        &["sh", "-c", ". /app/.profile.d/python.sh && cd /app && python -c 'import six, sys; print(six.__version__, sys.prefix)'"],
    );
    assert!(
        ok && output.trim() == "1.16.0 /app/.venv",
        "venv on the run stack: {output}"
    );

    // A requirement PyPI does not have fails the build with pip's own error.
    let bad = tmp.path().join("bad");
    fs::create_dir_all(&bad).unwrap();
    fs::write(
        bad.join("requirements.txt"),
        "this-package-does-not-exist-berth==1.0\n",
    )
    .unwrap();
    let (ok, output) = run_buildpacks(
        &build,
        &work(),
        &bad,
        &cache,
        &env,
        &tmp.path().join("out2"),
    );
    assert!(!ok, "a bad requirement must fail the build:\n{output}");
    assert!(
        output
            .contains("No matching distribution found for this-package-does-not-exist-berth==1.0"),
        "pip's error is visible:\n{output}"
    );
    assert!(
        output.contains("buildpack python failed to compile"),
        "{output}"
    );
}

/// A `docker save` archive of two layers (the second gzip-compressed, deleting a file of the
/// first with an OCI whiteout) imports under its RepoTag with its config; the store's own OCI
/// layout, packed as a tar, imports into another store as an OCI archive.
#[test]
fn images_import_docker_save_and_oci_archives() {
    use tar::EntryType::*;
    let tmp = tempfile::tempdir().unwrap();
    let layer_tar = |entries: &[(&str, &[u8])]| -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = header(Regular, 0o644, 0, data.len() as u64);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    };
    let first = layer_tar(&[("bin/hello", b"hi"), ("gone", b"old")]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &layer_tar(&[(".wh.gone", b""), ("new", b"n")])).unwrap();
    let second = gz.finish().unwrap();
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"Cmd":["/bin/hello"],"Entrypoint":null,"ExposedPorts":{"8080/tcp":{}},"WorkingDir":"/srv"},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let manifest = br#"[{"Config":"cfg.json","RepoTags":["hello:1"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#;
    let archive = tmp.path().join("saved.tar");
    let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
    for (name, data) in [
        ("l1/layer.tar", &first[..]),
        ("l2/layer.tar", &second[..]),
        ("cfg.json", &config[..]),
        ("manifest.json", &manifest[..]),
    ] {
        let mut h = header(Regular, 0o644, 0, data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    }
    b.finish().unwrap();
    drop(b);

    let store = ImageStore::open(&tmp.path().join("images")).unwrap();
    let (name, digest) = store.import_archive(&archive, None).unwrap();
    assert_eq!(name, "hello:1");
    assert_eq!(store.resolve("hello:1").as_deref(), Some(digest.as_str()));
    let image = store.image(&digest).unwrap();
    assert_eq!(image.config.env, ["A=1"]);
    assert_eq!(image.config.cmd, ["/bin/hello"]);
    assert_eq!(image.config.working_dir, "/srv");
    assert_eq!(image.config.port(), Some(8080));
    assert_eq!(image.layers.len(), 2);
    assert_eq!(
        fs::read(image.layers[0].dir.join("bin/hello")).unwrap(),
        b"hi"
    );
    // The whiteout became overlayfs's: a 0:0 character device where `gone` was.
    let gone = fs::symlink_metadata(image.layers[1].dir.join("gone")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &gone.file_type()
    ));
    assert_eq!(gone.rdev(), 0);
    assert!(!image.layers[1].dir.join(".wh.gone").exists());

    // Exported, it is an archive (docker save and OCI at once) another store imports.
    let oci = tmp.path().join("oci.tar");
    store
        .export(&digest, Some("hello:1"), fs::File::create(&oci).unwrap())
        .unwrap();
    let other = ImageStore::open(&tmp.path().join("other")).unwrap();
    let (name, again) = other.import_archive(&oci, None).unwrap();
    assert_eq!(
        (name.as_str(), again.as_str()),
        ("hello:1", digest.as_str())
    );
    // Without manifest.json it is an OCI archive alone, read through index.json.
    let oci_only = tmp.path().join("oci-only.tar");
    let mut b = tar::Builder::new(fs::File::create(&oci_only).unwrap());
    for entry in tar::Archive::new(fs::File::open(&oci).unwrap())
        .entries()
        .unwrap()
    {
        let mut entry = entry.unwrap();
        if entry.path().unwrap() != Path::new("manifest.json") {
            let mut h = entry.header().clone();
            let path = entry.path().unwrap().into_owned();
            b.append_data(&mut h, path, &mut entry).unwrap();
        }
    }
    b.finish().unwrap();
    drop(b);
    let third = ImageStore::open(&tmp.path().join("third")).unwrap();
    let (name, again) = third.import_archive(&oci_only, None).unwrap();
    assert_eq!(
        (name.as_str(), again.as_str()),
        ("hello:1", digest.as_str())
    );
    let (_, renamed) = other.import_archive(&oci, Some("base")).unwrap();
    assert_eq!(other.resolve("base"), Some(renamed));

    // Not an image archive: a plain layer tar.
    let plain = tmp.path().join("plain.tar");
    fs::write(&plain, &first).unwrap();
    let err = store.import_archive(&plain, None);
    assert!(matches!(err, Err(ImageError::BadArchive { .. })), "{err:?}");
}

/// A build step's overlay upper dir (a deleted file is a 0:0 character device, a replaced
/// folder carries the opaque xattr) packs to OCI whiteouts and extracts back to overlay's form.
#[test]
fn root_layers_keep_deletions_as_whiteouts() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("images")).unwrap();
    let upper = tmp.path().join("upper");
    fs::create_dir_all(upper.join("etc/replaced")).unwrap();
    fs::write(upper.join("etc/kept"), "k").unwrap();
    nix::sys::stat::mknod(
        &upper.join("etc/deleted"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    let dir = std::ffi::CString::new(
        upper
            .join("etc/replaced")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: valid NUL-terminated strings; a one-byte value.
    let rc = unsafe {
        nix::libc::lsetxattr(
            dir.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(rc, 0, "setting trusted.overlay.opaque needs root");

    let layer = store.layer_from_root(&upper).unwrap();
    let tar = store.write_layer_tar(&layer.digest, Vec::new()).unwrap();
    let names = tar_names(&tar);
    assert!(names.contains(&"etc/.wh.deleted".to_string()), "{names:?}");
    assert!(!names.contains(&"etc/deleted".to_string()), "{names:?}");
    assert!(
        names.contains(&"etc/replaced/.wh..wh..opq".to_string()),
        "{names:?}"
    );
    // Imported from that tar into another store: overlay's form again, the same digest.
    let other = ImageStore::open(&tmp.path().join("other")).unwrap();
    let tar_path = tmp.path().join("layer.tar");
    fs::write(&tar_path, &tar).unwrap();
    let again = other.import_layer_tar(&tar_path).unwrap();
    assert_eq!(again.digest, layer.digest);
    let deleted = fs::symlink_metadata(again.dir.join("etc/deleted")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &deleted.file_type()
    ));
    assert_eq!(deleted.rdev(), 0);
    assert_eq!(fs::read(again.dir.join("etc/kept")).unwrap(), b"k");
    let mut value = [0u8; 1];
    let dir = std::ffi::CString::new(
        again
            .dir
            .join("etc/replaced")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the length passed.
    let n = unsafe {
        nix::libc::lgetxattr(
            dir.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            1,
        )
    };
    assert_eq!((n, value[0]), (1, b'y'), "the opaque mark is back");
}

/// Collection keeps tagged images and those it is told to keep, with their layers and their
/// builds' earlier stages' layers; removes the rest (manifest, config, layer record and files),
/// step cache entries naming removed layers, and what a crash left half-deleted.
#[test]
fn collect_removes_what_nothing_keeps() {
    use std::collections::HashSet;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    let store = ImageStore::open(&root).unwrap();
    let layer = |name: &str, contents: &str| {
        let dir = tmp.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), contents).unwrap();
        store.layer_from_dir(&dir, "app").unwrap()
    };
    let base = layer("base", "shared by every image");
    let (kept_top, gone_top, stage) = (layer("kept", "k"), layer("gone", "g"), layer("stage", "s"));
    let config = ImageConfig::default();
    let tagged = store
        .put_image(std::slice::from_ref(&base), &config)
        .unwrap();
    store.tag("base:1", &tagged).unwrap();
    let kept = store
        .put_image(&[base.clone(), kept_top.clone()], &config)
        .unwrap();
    store
        .note_stage_layers(&kept, std::slice::from_ref(&stage))
        .unwrap();
    let gone = store
        .put_image(&[base.clone(), gone_top.clone()], &config)
        .unwrap();
    let key = |c: char| c.to_string().repeat(64);
    store.cache_layer(&key('a'), &gone_top).unwrap();
    store.cache_layer(&key('b'), &stage).unwrap();
    // A crash between a layer's move into place and its record: a directory nothing names.
    fs::create_dir_all(root.join("l/0123456789ab")).unwrap();
    let digests = |store: &ImageStore| -> HashSet<String> {
        store
            .images()
            .unwrap()
            .into_iter()
            .map(|i| i.digest)
            .collect()
    };
    assert_eq!(
        digests(&store),
        HashSet::from([tagged.clone(), kept.clone(), gone.clone()])
    );

    let done = store.collect(&HashSet::from([kept.clone()])).unwrap();
    assert_eq!(
        (done.images, done.layers, done.step_cache_entries),
        (1, 1, 1)
    );
    assert_eq!(
        digests(&store),
        HashSet::from([tagged.clone(), kept.clone()])
    );
    assert!(!gone_top.dir.exists());
    assert!(!root.join("layers").join(&gone_top.digest[7..]).exists());
    assert!(!root.join("l/0123456789ab").exists());
    assert!(store.cached_layer(&key('a')).is_none());
    assert_eq!(
        store.cached_layer(&key('b')),
        Some(stage.clone()),
        "an earlier stage of a kept image stays cached"
    );
    assert_eq!(
        store.image(&kept).unwrap().layers,
        vec![base.clone(), kept_top.clone()]
    );
    assert!(store.image(&tagged).is_ok());
    assert!(matches!(
        store.image(&gone),
        Err(ImageError::NotFound { .. })
    ));

    // A crash after a manifest went leaves what only it named; the next collection removes it.
    fs::remove_file(root.join("blobs/sha256").join(&kept[7..])).unwrap();
    let done = store.collect(&HashSet::new()).unwrap();
    assert_eq!(
        (done.images, done.layers, done.step_cache_entries),
        (0, 2, 1)
    );
    assert!(!kept_top.dir.exists() && !stage.dir.exists());
    assert!(base.dir.is_dir(), "the tagged image's layer stays");
    let blobs = fs::read_dir(root.join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs, 2, "the tagged image's manifest and config");
    assert_eq!(fs::read_dir(root.join("stages")).unwrap().count(), 0);
}

/// A registry as they are run in the open: Debian's `docker-registry` over HTTPS with a
/// certificate of a CA that the host trusts, handing out bearer tokens from a token server
/// (HTTPS too) that takes the login. berth pulls the image with the login; without it, or
/// once the host no longer trusts the CA, the pull is refused saying why.
///
/// The name `registry.test` and the CA are real to every process of a thread that has its
/// own mount namespace, with `/etc/hosts` and the host's CA bundle bound over (they go away
/// with the thread): berth resolves and trusts as on any host.
#[test]
fn pulls_over_https_with_bearer_tokens_from_a_token_server() {
    if !prerequisites_met("registry test", &["docker-registry", "skopeo", "curl"]) {
        return;
    }
    std::thread::spawn(https_token_pull).join().unwrap();
}

fn https_token_pull() {
    use berth::image::pull::{Login, PullError};
    use nix::mount::{mount, umount, MsFlags};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use registry::{busybox_layout, Registry, Tls};

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let write = |name: &str, text: &str| {
        fs::write(dir.join(name), text).unwrap();
        dir.join(name)
    };
    // The CA, the certificate of registry.test it signs, and the token signer's own.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["registry.test".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let tls = Tls {
        cert: &write("server.pem", &server_cert.pem()),
        key: &write("server.key", &server_key.serialize_pem()),
    };
    let signer_key = KeyPair::generate().unwrap();
    let signer_cert = CertificateParams::new(Vec::new())
        .unwrap()
        .self_signed(&signer_key)
        .unwrap();
    let signer_pem = write("signer.pem", &signer_cert.pem());

    // This thread's own view of /etc/hosts and of the host's CA bundle.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS | nix::sched::CloneFlags::CLONE_FS)
        .unwrap();
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
    let bundle = fs::read_to_string(HOST_CA).unwrap() + &ca_pem;
    let hosts = "127.0.0.1 localhost registry.test\n";
    for (file, target) in [
        (write("bundle.pem", &bundle), HOST_CA),
        (write("hosts", hosts), "/etc/hosts"),
    ] {
        mount(
            Some(&file),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let token_listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let token_port = token_listener.local_addr().unwrap().port();
    let scopes = Arc::new(std::sync::Mutex::new(Vec::new()));
    runtime.spawn(token_server::serve(
        token_listener,
        (server_cert.der().clone(), server_key.serialize_der()),
        (signer_cert.der().clone(), signer_key.serialize_der()),
        scopes.clone(),
    ));
    let realm = format!("https://registry.test:{token_port}/token");
    let login = registry::Login::Token {
        realm: &realm,
        service: token_server::SERVICE,
        issuer: token_server::ISSUER,
        cert: &signer_pem,
    };
    let registry = Registry::start(dir, "registry.test", login, Some(tls));
    let layout = dir.join("layout");
    busybox_layout(&layout, "1");
    registry.push(&layout, "1", "team/web", token_server::LOGIN);

    let images = Arc::new(ImageStore::open(&dir.join("images")).unwrap());
    let reference = format!("{}/team/web:1", registry.host);
    let pull = |login: Option<Login>| {
        runtime.block_on(images.pull(
            &reference,
            login,
            true,
            &berth::progress::Progress::discard(),
        ))
    };
    let login = || {
        let (user, password) = token_server::LOGIN.split_once(':').unwrap();
        Some(Login {
            user: user.into(),
            password: password.into(),
        })
    };
    let digest = pull(login()).unwrap();
    let image = images.image(&digest).unwrap();
    assert_eq!(image.layers.len(), 1);
    assert!(
        scopes
            .lock()
            .unwrap()
            .iter()
            .any(|s| s == "repository:team/web:pull"),
        "{scopes:?}"
    );
    // No login: the token server refuses, and so does berth, saying how to log in.
    let refused = pull(None).unwrap_err();
    assert!(matches!(refused, PullError::Denied { .. }), "{refused}");
    assert!(
        refused.to_string().contains("BERTH_REGISTRY_USER"),
        "{refused}"
    );
    // The host no longer trusts the CA: no pull.
    umount(HOST_CA).unwrap();
    let untrusted = pull(login()).unwrap_err();
    assert!(
        matches!(untrusted, PullError::Untrusted { .. }),
        "{untrusted}"
    );
    assert!(
        untrusted.to_string().contains("SSL_CERT_FILE"),
        "{untrusted}"
    );
    drop(registry);
}

/// A token server as Docker's token authentication describes it: `GET /token?service=…&scope=…`
/// with the login as HTTP basic answers `{"token": JWT}` granting the scope (ES256, its
/// certificate in the `x5c` header, as `docker-registry` checks it); no or a wrong login
/// answers 401.
mod token_server {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use base64::Engine;
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Request, Response};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::sync::{Arc, Mutex};

    pub const SERVICE: &str = "berth-test-registry";
    pub const ISSUER: &str = "berth-test-token-server";
    pub const LOGIN: &str = "puller:s3cret";

    /// Serves `listener` over TLS with `tls` (certificate, PKCS#8 key), signing with `signer`;
    /// the scopes asked for are pushed onto `scopes`.
    pub async fn serve(
        listener: tokio::net::TcpListener,
        tls: (CertificateDer<'static>, Vec<u8>),
        signer: (CertificateDer<'static>, Vec<u8>),
        scopes: Arc<Mutex<Vec<String>>>,
    ) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![tls.0],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(tls.1)),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let signer = Arc::new(signer);
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, signer, scopes) = (acceptor.clone(), signer.clone(), scopes.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request| {
                    let answer = answer(&request, &signer, &scopes);
                    async move { Ok::<_, std::convert::Infallible>(answer) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    fn answer<B>(
        request: &Request<B>,
        signer: &(CertificateDer<'static>, Vec<u8>),
        scopes: &Mutex<Vec<String>>,
    ) -> Response<Full<Bytes>> {
        let basic = format!("Basic {}", STANDARD.encode(LOGIN));
        let authorized = request
            .headers()
            .get("authorization")
            .is_some_and(|h| h.as_bytes() == basic.as_bytes());
        if !authorized {
            return Response::builder()
                .status(401)
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
        }
        let url = reqwest::Url::parse(&format!("https://token{}", request.uri())).unwrap();
        let mut access = Vec::new();
        for (key, value) in url.query_pairs() {
            if key == "scope" {
                scopes.lock().unwrap().push(value.to_string());
                let mut parts = value.splitn(3, ':');
                let (kind, name, actions) = (parts.next(), parts.next(), parts.next());
                access.push(serde_json::json!({
                    "type": kind,
                    "name": name,
                    "actions": actions.unwrap_or_default().split(',').collect::<Vec<_>>(),
                }));
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [STANDARD.encode(&signer.0)],
        });
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": "puller",
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("{now}-{}", access.len()),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &signer.1,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        let signature = key
            .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
            .unwrap();
        let token = format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        );
        let body = serde_json::json!({ "token": token }).to_string();
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    }
}
