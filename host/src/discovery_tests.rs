use super::*;

fn candidate(file: &str, name: &str, version: &str) -> Candidate {
    let text =
        format!("name = \"{name}\"\nversion = \"{version}\"\nlibrary = \"l.so\"\napi = \"^1\"\n");
    Candidate {
        manifest_path: PathBuf::from(file),
        manifest: Some(Manifest::parse(Path::new(file), &text).unwrap()),
        library: Some(PathBuf::from("l.so")),
        report: None,
        status: Status::Ready,
        fingerprint: None,
    }
}

fn statuses(cs: &[Candidate]) -> Vec<String> {
    cs.iter()
        .map(|c| match &c.status {
            Status::Ready => "ready".to_string(),
            Status::Superseded { by } => format!("superseded by {by}"),
            Status::Failed(e) => e.kind().to_string(),
        })
        .collect()
}

#[test]
fn highest_version_of_each_name_wins() {
    let mut cs = vec![
        candidate("a.toml", "a", "0.9.0"),
        candidate("b.toml", "a", "0.10.0"),
        candidate("c.toml", "b", "1.0.0"),
    ];
    select(&mut cs);
    assert_eq!(statuses(&cs), ["superseded by 0.10.0", "ready", "ready"]);
}

#[test]
fn failed_candidates_do_not_compete() {
    let mut cs = vec![
        candidate("a.toml", "a", "0.9.0"),
        candidate("b.toml", "a", "2.0.0"),
    ];
    cs[1].status = Status::Failed(CheckError::Manifest("broken".into()));
    select(&mut cs);
    assert_eq!(statuses(&cs), ["ready", "manifest"]);
}

#[test]
fn same_name_and_version_twice_is_a_duplicate_on_both() {
    let mut cs = vec![
        candidate("a.toml", "a", "1.0.0"),
        candidate("b.toml", "a", "1.0.0"),
        candidate("c.toml", "a", "0.5.0"),
    ];
    select(&mut cs);
    assert_eq!(statuses(&cs), ["duplicate", "duplicate", "ready"]);
}

#[test]
fn scan_reports_a_missing_directory() {
    let e = scan(&[PathBuf::from("/no/such/plugins")]).unwrap_err();
    assert!(e.to_string().contains("/no/such/plugins"), "{e}");
}

#[test]
fn scan_finds_only_toml_files_in_order() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["b.toml", "a.toml", "libx.so", "notes.txt"] {
        std::fs::write(dir.path().join(f), "").unwrap();
    }
    let found = scan(&[dir.path().to_path_buf()]).unwrap();
    let names: Vec<_> = found
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(names, ["a.toml", "b.toml"]);
}

/// A `*.toml` that cannot be read as a manifest (a dangling link, a FIFO, a huge file) is found
/// and fails its check saying why, without blocking the scan; hidden files and folders are
/// passed over.
#[test]
fn manifests_that_are_not_small_regular_files_fail_their_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::os::unix::fs::symlink(d.join("gone"), d.join("dangling.toml")).unwrap();
    nix::unistd::mkfifo(
        &d.join("fifo.toml"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::fs::write(d.join("huge.toml"), vec![b'#'; 2 << 20]).unwrap();
    std::fs::write(d.join(".#lock.toml"), "").unwrap();
    std::fs::create_dir(d.join("folder.toml")).unwrap();
    let found = scan(&[d.to_path_buf()]).unwrap();
    let names: Vec<_> = found
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(names, ["dangling.toml", "fifo.toml", "huge.toml"]);
    for (path, why) in found
        .iter()
        .zip(["No such file", "not a regular file", "at most"])
    {
        let c = check_static(path, &SearchPaths::default());
        let Status::Failed(e) = &c.status else {
            panic!("{}: {:?}", path.display(), c.status);
        };
        assert!(e.to_string().contains(why), "{e}");
    }
}

#[test]
fn a_pinned_digest_is_compared_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("libx.so"), b"abc").unwrap();
    // sha256("abc")
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    assert_eq!(sha256_file(&dir.path().join("libx.so")).unwrap(), abc);
    let manifest = dir.path().join("x.toml");
    let base = "name = \"x\"\nversion = \"0.1.0\"\nlibrary = \"libx.so\"\napi = \"^1\"\n";
    std::fs::write(&manifest, format!("{base}sha256 = \"{abc}\"\n")).unwrap();
    let c = check_static(&manifest, &SearchPaths::default());
    assert!(matches!(c.status, Status::Ready), "{:?}", c.status);
    std::fs::write(
        &manifest,
        format!("{base}sha256 = \"{}\"\n", "1".repeat(64)),
    )
    .unwrap();
    let c = check_static(&manifest, &SearchPaths::default());
    assert!(matches!(
        c.status,
        Status::Failed(CheckError::Sha256Mismatch { .. })
    ));
}

/// A pinned library swapped after its check (by whoever may write its folder) is not probed:
/// the probe runs a copy of the bytes it checked against the pin, and bytes that no longer
/// match fail the check without running.
#[test]
fn a_pinned_library_swapped_after_its_check_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("libx.so"), b"abc").unwrap();
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    let manifest = dir.path().join("x.toml");
    let text = format!(
        "name = \"x\"\nversion = \"0.1.0\"\nlibrary = \"libx.so\"\napi = \"^1\"\nsha256 = \"{abc}\"\n"
    );
    std::fs::write(&manifest, text).unwrap();
    let mut c = check_static(&manifest, &SearchPaths::default());
    assert!(matches!(c.status, Status::Ready), "{:?}", c.status);
    std::fs::write(dir.path().join("libx.so"), b"swapped").unwrap();
    // A probe that would run anything: it is never started.
    let prober = Prober::new(PathBuf::from("/bin/true"));
    check_library(&mut c, &prober);
    let Status::Failed(e) = &c.status else {
        panic!("probed: {:?}", c.status);
    };
    assert!(
        e.to_string().contains("changed while it was checked"),
        "{e}"
    );
}

/// The fingerprint is of the manifest text that was parsed and of the library as it was then:
/// the candidate says what it checked, whatever the files say by the time hot plug compares.
#[test]
fn the_fingerprint_is_of_what_was_checked() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("libx.so");
    std::fs::write(&library, b"abc").unwrap();
    let manifest = dir.path().join("x.toml");
    let text = "name = \"x\"\nversion = \"0.1.0\"\nlibrary = \"libx.so\"\napi = \"^1\"\n";
    std::fs::write(&manifest, text).unwrap();
    let checked = check_static(&manifest, &SearchPaths::default());
    let hex = |b: &[u8]| -> String { b.iter().map(|x| format!("{x:02x}")).collect() };
    let expected = hex(&Sha256::digest([text.as_bytes(), b"abc"].concat()));
    assert_eq!(checked.fingerprint.as_deref(), Some(expected.as_str()));
    // Edited after the check: the next check's fingerprint differs from the one kept.
    std::fs::write(&manifest, format!("{text}tier = \"maximum\"\n")).unwrap();
    std::fs::write(&library, b"abd").unwrap();
    let again = check_static(&manifest, &SearchPaths::default());
    assert_ne!(again.fingerprint, checked.fingerprint);
    assert_eq!(checked.fingerprint.as_deref(), Some(expected.as_str()));
}

/// A manifest asking for a newer plugin-api than the host's says both ways out: a newer PIO, or
/// a fixed `api` for a library built against this one.
#[test]
fn an_api_requirement_the_host_cannot_meet_says_both_ways_out() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("libx.so"), b"abc").unwrap();
    let manifest = dir.path().join("x.toml");
    let text = "name = \"x\"\nversion = \"0.1.0\"\nlibrary = \"libx.so\"\napi = \"^1.99\"\n";
    std::fs::write(&manifest, text).unwrap();
    let c = check_static(&manifest, &SearchPaths::default());
    let Status::Failed(e @ CheckError::ApiRequirement { .. }) = &c.status else {
        panic!("{:?}", c.status);
    };
    let e = e.to_string();
    assert!(e.contains("x.toml:4:7") && e.contains("^1.99"), "{e}");
    assert!(e.contains("upgrade PIO"), "{e}");
    assert!(
        e.contains("fix the manifest's `api`") && e.contains("`pio check` on the library"),
        "{e}"
    );
}

/// The error says every folder it looked in, the manifest's own as `.` when its path is a bare
/// file name, and an absolute library's folder.
#[test]
fn a_missing_library_names_the_folders_looked_in() {
    let search = SearchPaths {
        library_dirs: vec![PathBuf::from("/opt/pio/lib")],
        ..SearchPaths::default()
    };
    let looked_in = |library: &str| {
        let text =
            format!("name = \"x\"\nversion = \"0.1.0\"\nlibrary = \"{library}\"\napi = \"^1\"\n");
        let manifest = Manifest::parse(Path::new("x.toml"), &text).unwrap();
        match find_library(Path::new("x.toml"), &text, &manifest, &search) {
            Err(CheckError::LibraryNotFound { searched, .. }) => searched,
            other => panic!("{library}: {other:?}"),
        }
    };
    assert_eq!(looked_in("libmissing-pio-test.so"), "., /opt/pio/lib");
    assert_eq!(looked_in("/nonexistent/pio/libx.so"), "/nonexistent/pio");
}

/// A model path that is not there fails the check with where `path` is written; a folder or a
/// file (a GGUF model) that is there, relative to the manifest's folder, passes.
#[test]
fn the_model_must_be_there() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("libx.so"), b"abc").unwrap();
    std::fs::create_dir(dir.path().join("snapshot")).unwrap();
    std::fs::write(dir.path().join("model.gguf"), b"").unwrap();
    let manifest = dir.path().join("x.toml");
    let checked = |path: &str| {
        let text = format!(
            "name = \"x\"\nversion = \"0.1.0\"\nlibrary = \"libx.so\"\napi = \"^1\"\n\
             [model]\npath = \"{path}\"\n"
        );
        std::fs::write(&manifest, text).unwrap();
        check_static(&manifest, &SearchPaths::default())
    };
    let status_with = |path: &str| checked(path).status;
    assert!(matches!(status_with("snapshot"), Status::Ready));
    assert!(matches!(status_with("model.gguf"), Status::Ready));
    // The library is still found (and then probed): `--model-path` can bring the model.
    let missing = checked("snapshots");
    assert!(missing.ready_given_a_model() && missing.library.is_some());
    let Status::Failed(e) = status_with("snapshots") else {
        panic!("a missing model passed");
    };
    assert!(
        matches!(
            e,
            CheckError::ModelMissing {
                line: 6,
                column: 8,
                ..
            }
        ),
        "{e:?}"
    );
    let message = e.to_string();
    assert!(
        message.contains(&format!(
            "model {} does not exist",
            dir.path().join("snapshots").display()
        )) && message.contains("fix `[model] path`"),
        "{message}"
    );
    // A manifest named by a relative path (as `pio check x.toml` does) still says where the
    // model was looked for in full.
    let up: PathBuf = std::env::current_dir()
        .unwrap()
        .components()
        .skip(1)
        .map(|_| "..")
        .collect();
    let relative = up.join(manifest.strip_prefix("/").unwrap());
    let Status::Failed(e) = check_static(&relative, &SearchPaths::default()).status else {
        panic!("a missing model passed");
    };
    let message = e.to_string();
    let full = dir.path().canonicalize().unwrap().join("snapshots");
    assert!(
        message.contains(&format!("model {} does not exist", full.display())),
        "{message}"
    );
}

/// A model the workers' user cannot read (a weight file left 0600) fails the check naming the
/// file and the fix, not a load later; the library is still usable with another model.
#[test]
fn the_model_must_be_readable_to_the_workers() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only root drops the probes and workers to another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    mode(dir.path(), 0o755).unwrap();
    let snapshot = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();
    let shard = snapshot.join("model-00002-of-00002.safetensors");
    std::fs::write(&shard, b"x").unwrap();
    mode(&shard, 0o600).unwrap();
    let manifest = dir.path().join("x.toml");
    std::fs::write(
        &manifest,
        "name = \"x\"\nversion = \"0.1.0\"\nlibrary = \"libx.so\"\napi = \"^1\"\n[model]\npath = \"snapshot\"\n",
    )
    .unwrap();
    let parsed = Manifest::parse(&manifest, &std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let prober = Prober::new(PathBuf::from("/nonexistent")).with_users(&crate::sandbox::Policy {
        users: crate::sandbox::users::WorkerUsers::Shared(65534),
        ..Default::default()
    });
    let e = check_model_readable(&manifest, &parsed, &prober).unwrap_err();
    assert_eq!(e.kind(), "model_unreadable");
    let message = e.to_string();
    assert!(
        message.contains(&shard.display().to_string())
            && message.contains("uid 65534")
            && message.contains("chmod o+r"),
        "{message}"
    );
    mode(&shard, 0o644).unwrap();
    assert!(check_model_readable(&manifest, &parsed, &prober).is_ok());
}
