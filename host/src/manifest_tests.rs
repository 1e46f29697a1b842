use super::*;

const FULL: &str = r#"
name = "qwen3-coder-30b"
version = "1.2.3"
description = "Qwen3-Coder-30B-A3B-Instruct"
library = "libpio_plugin_qwen3_coder_30b.so"
api = "^1.1"
sha256 = "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
tier = "high"

[limits]
memory = "18GiB"
cpus = 2
pids = 128
gpu_memory = "16G"
scratch = 1048576
network = false

[model]
path = "/models/Qwen3-Coder-30B-A3B-Instruct"
dtype = "bf16"
device = "cuda:1"
quantization = "q4"

[model.generation]
temperature = 0.7
top_p = 0.8
top_k = 20

[model.options]
rope_scaling_factor = 4
"#;

fn parse(text: &str) -> Result<Manifest, ManifestError> {
    Manifest::parse(Path::new("plugins/x.toml"), text)
}

fn parse_err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

const MINIMAL: &str = "name = \"x\"\nversion = \"0.1.0\"\nlibrary = \"libx.so\"\napi = \"^1.0\"\n";

#[test]
fn a_full_manifest_parses_into_typed_values() {
    let m = parse(FULL).unwrap();
    assert_eq!(m.name, "qwen3-coder-30b");
    assert_eq!(m.version, semver::Version::new(1, 2, 3));
    assert!(m.api.get_ref().matches(&semver::Version::new(1, 4, 0)));
    assert_eq!(
        m.sha256.unwrap().get_ref().0,
        FULL[FULL.find("ABCDEF").unwrap()..][..64].to_ascii_lowercase()
    );
    assert_eq!(m.tier, Tier::High);
    assert_eq!(m.limits.memory, Some(ByteSize(18 << 30)));
    assert_eq!(m.limits.cpus, Some(PositiveF64(2.0)));
    assert_eq!(m.limits.scratch, Some(ByteSize(1 << 20)));
    assert_eq!(m.limits.network, Some(false));
    assert_eq!(m.model.dtype, Some(Dtype::Bf16));
    assert_eq!(m.model.device, Some(Device("cuda:1".into())));
    assert_eq!(m.model.quantization, Some(Quantization::Q4));
    assert_eq!(m.model.generation.top_k, Some(20));
    assert_eq!(m.model.options["rope_scaling_factor"].as_integer(), Some(4));
}

#[test]
fn defaults_apply_to_a_minimal_manifest() {
    let m = parse(MINIMAL).unwrap();
    assert_eq!(
        m.tier,
        Tier::Medium,
        "unlabelled plugins are not trusted as first-party"
    );
    assert_eq!(m.limits, Limits::default());
    assert!(m.sha256.is_none());
}

#[test]
fn unknown_keys_are_errors_with_file_line_and_column() {
    let e = parse_err(&format!("{MINIMAL}[limits]\nmemroy = \"1G\"\n"));
    assert!(e.starts_with("plugins/x.toml:6:1: "), "{e}");
    assert!(
        e.contains("memroy") && e.contains("memory"),
        "names the key and the valid ones: {e}"
    );
}

#[test]
fn bad_values_name_what_was_expected() {
    let cases = [
        ("version = \"0.1.0\"", "version = \"one\"", "2:11"),
        ("api = \"^1.0\"", "api = \"^^1\"", "4:7"),
        (
            "library = \"libx.so\"",
            "library = \"libx.so\"\nsha256 = \"abc\"",
            "4:10",
        ),
    ];
    for (from, to, at) in cases {
        let e = parse_err(&MINIMAL.replace(from, to));
        assert!(e.contains(at), "{to}: expected position {at}: {e}");
        let key = to.rsplit('\n').next().unwrap().split(' ').next().unwrap();
        assert!(e.contains(&format!("`{key}`")), "names the key {key}: {e}");
    }
    let e = parse_err(&format!("{MINIMAL}[limits]\nmemory = \"lots\"\n"));
    assert!(e.contains("6:10") && e.contains("512MiB"), "{e}");
    let e = parse_err(&format!("{MINIMAL}[limits]\ncpus = 0\n"));
    assert!(e.contains("> 0"), "{e}");
    let e = parse_err(&format!("{MINIMAL}[model]\ndevice = \"tpu\"\n"));
    assert!(e.contains("cuda:N") && e.contains("tpu"), "{e}");
    let e = parse_err(&format!("{MINIMAL}[model]\nquantization = \"q3\"\n"));
    assert!(e.contains("q3") && e.contains("q4"), "{e}");
    let e = parse_err(&format!("{MINIMAL}[model.generation]\ntemprature = 1.0\n"));
    assert!(e.contains("temprature"), "{e}");
}

/// A name goes into URLs, cgroup paths and log lines as it is: one that could climb out of a
/// folder, nest one, or break a line is refused where it is written.
#[test]
fn names_that_are_not_plain_are_refused() {
    for bad in ["../../h", "Qwen/echo", "a\nb", "", ".hidden", "sp ace"] {
        let text = MINIMAL.replace("name = \"x\"", &format!("name = {bad:?}"));
        let e = parse_err(&text);
        assert!(
            e.contains("1:8") && e.contains("letters, digits"),
            "{bad:?}: {e}"
        );
        let text = format!("{MINIMAL}plugin = {bad:?}\n");
        assert!(parse_err(&text).contains("letters, digits"), "{bad:?}");
    }
    for good in ["qwen3-4b-instruct-2507", "Qwen3.5_big", "x"] {
        let text = MINIMAL.replace("name = \"x\"", &format!("name = {good:?}"));
        assert_eq!(parse(&text).unwrap().name, good);
    }
}

/// A limit of nothing and a default no request may ask for are refused when the manifest is
/// read (by `pio check` too), naming the file, the line and the key.
#[test]
fn limits_of_nothing_and_out_of_range_defaults_are_refused() {
    for (limit, line) in [
        ("memory = \"0\"", "6:10"),
        ("memory = 0", "6:10"),
        ("pids = 0", "6:8"),
        ("gpu_memory = \"0GiB\"", "6:14"),
    ] {
        let e = parse_err(&format!("{MINIMAL}[limits]\n{limit}\n"));
        let key = limit.split(' ').next().unwrap();
        assert!(
            e.contains("plugins/x.toml") && e.contains(line) && e.contains(&format!("`{key}`")),
            "{limit}: {e}"
        );
        let says = if key == "memory" {
            "must be at least 16MiB"
        } else {
            "must be more than 0"
        };
        assert!(e.contains(says), "{limit}: {e}");
    }
    // Memory no worker could start in.
    let e = parse_err(&format!("{MINIMAL}[limits]\nmemory = \"1KiB\"\n"));
    assert!(
        e.contains("6:10") && e.contains("at least 16MiB") && e.contains("1024 bytes"),
        "{e}"
    );
    assert!(parse(&format!("{MINIMAL}[limits]\nmemory = \"16MiB\"\n")).is_ok());
    assert!(parse(&format!("{MINIMAL}[limits]\nscratch = 0\n")).is_ok());
    for (default, says) in [
        ("max_tokens = 0", "`max_tokens` must be at least 1"),
        (
            "temperature = -3",
            "`temperature` must be between 0 and 2, found -3",
        ),
        ("top_p = 7", "`top_p` must be between 0 and 1"),
        ("top_p = 0", "`top_p` must be greater than 0"),
        ("repetition_penalty = 0", "`repetition_penalty`"),
        ("min_p = 1.5", "`min_p`"),
    ] {
        let e = parse_err(&format!("{MINIMAL}[model.generation]\n{default}\n"));
        assert!(
            e.contains("plugins/x.toml") && e.contains("[model.generation]") && e.contains(says),
            "{default}: {e}"
        );
    }
    let ok = parse(&format!(
        "{MINIMAL}[model.generation]\ntemperature = 0\nmax_tokens = 1\n"
    ));
    assert!(ok.is_ok(), "{:?}", ok.err());
}

#[test]
fn missing_required_keys_are_named() {
    let e = parse_err("name = \"x\"\nversion = \"0.1.0\"\napi = \"^1\"\n");
    assert!(e.contains("missing field `library`"), "{e}");
    // Not blamed on the key of the line the table starts at.
    assert!(!e.contains("`name`"), "{e}");
}

#[test]
fn tiers_are_ordered_by_confinement() {
    assert!(Tier::Low < Tier::Medium && Tier::Medium < Tier::High && Tier::High < Tier::Maximum);
}

#[test]
fn line_column_counts_from_one() {
    assert_eq!(line_column("ab\ncd", 0), (1, 1));
    assert_eq!(line_column("ab\ncd", 4), (2, 2));
}

/// Options are flattened into the config beside the `[model]` keys: one by a `[model]` key's
/// name would reach the worker twice (and stop it), so it is refused, pointing to its place.
#[test]
fn plugin_options_named_like_model_keys_are_refused() {
    for (key, hint) in [
        ("dtype = \"f32\"", "in `[model]` as `dtype`"),
        ("device = \"cpu\"", "`device`"),
        ("model_path = \"/m\"", "as `path`"),
        ("generation = 1", "`[model.generation]`"),
        ("quantization_cache = \"c\"", "`quantization_cache`"),
    ] {
        let e = parse_err(&format!("{MINIMAL}[model.options]\n{key}\n"));
        assert!(
            e.contains("plugins/x.toml") && e.contains("not a plugin option") && e.contains(hint),
            "{key}: {e}"
        );
    }
    let ok = parse(&format!("{MINIMAL}[model.options]\ndtype_hint = 1\n"));
    assert!(ok.is_ok(), "{:?}", ok.err());
}
