//! Fuzzing the parsers of untrusted input, in CI: the safetensors header reader (`SafetensorsFile::open`, then
//! reading every tensor it accepts) and the plan JSON parser (`Plan::from_json`, then executing what it accepts
//! over small real files). Inputs are arbitrary bytes and mutated valid files/plans (huge header lengths,
//! overflowing offsets and shapes, unicode and duplicate names, truncation). The property is the same everywhere:
//! an `Ok` or a `CoreError`, never a panic, and an accepted file's tensors lie inside it.
//!
//! The committed corpus (`tests/fuzz_corpus/`: `*.safetensors` files and `*.json` plans) is replayed on every
//! run; a failure proptest finds is saved under `proptest-regressions/` and replayed too, so every crash stays a
//! regression test. `FERROMERGE_FUZZ_CASES` sets the cases per property (default sized to about a minute in all
//! under `cargo test --release` on two cores).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferromerge_core::exec::{execute, ExecOptions};
use ferromerge_core::io::{write_safetensors, SafetensorsFile};
use ferromerge_core::plan::Plan;
use ferromerge_core::DType;
use proptest::prelude::*;

fn cases(default: u32) -> u32 {
    std::env::var("FERROMERGE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus")
}

/// Open `bytes` as a safetensors file; when accepted, every tensor lies inside the file and reads back.
fn check_file(dir: &Path, bytes: &[u8]) {
    let path = dir.join("f.safetensors");
    std::fs::write(&path, bytes).unwrap();
    if let Ok(f) = SafetensorsFile::open(&path) {
        for name in f.names_in_file_order() {
            let e = f.entry(name).unwrap();
            assert!(e.start <= e.end && e.end <= bytes.len(), "{name}: {}..{} in {}", e.start, e.end, bytes.len());
            assert_eq!(f.read_bytes(name).unwrap(), &bytes[e.start..e.end]);
        }
        f.check_unchanged().unwrap();
    }
}

/// A valid file's bytes from a header object and data length (written as the reference writer does).
fn file_bytes(header: &str, data_len: usize) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header.as_bytes());
    out.resize(out.len() + data_len, 0x3f);
    out
}

const DTYPES: [&str; 9] = ["F32", "F16", "BF16", "I64", "I8", "BOOL", "U8", "F64", "F8_E4M3"];

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z._0-9]{1,12}",
        "\\PC{0,6}",
        Just("__metadata__".to_string()),
        Just("model.layers.0.mlp.gate_proj.weight".to_string()),
    ]
}

/// A valid header (tensors contiguous in the order given) and its data length.
fn valid_header() -> impl Strategy<Value = (String, usize)> {
    prop::collection::vec((name(), 0..DTYPES.len(), prop::collection::vec(0usize..5, 0..3)), 0..5).prop_map(|ts| {
        let mut obj = serde_json::Map::new();
        let mut pos = 0usize;
        for (name, d, shape) in ts {
            if obj.contains_key(&name) {
                continue; // duplicates are a mutation of their own
            }
            if name == "__metadata__" {
                obj.insert(name, serde_json::json!({"format": "pt"}));
                continue;
            }
            let size = if DTYPES[d] == "F64" || DTYPES[d] == "I64" {
                8
            } else if DTYPES[d] == "F32" {
                4
            } else {
                2
            };
            let size = if ["I8", "BOOL", "U8", "F8_E4M3"].contains(&DTYPES[d]) { 1 } else { size };
            let n: usize = shape.iter().product::<usize>() * size;
            obj.insert(name, serde_json::json!({"dtype": DTYPES[d], "shape": shape, "data_offsets": [pos, pos + n]}));
            pos += n;
        }
        (serde_json::to_string(&obj).unwrap(), pos)
    })
}

/// One way to break a valid file.
#[derive(Debug, Clone)]
enum Mutation {
    FlipByte(usize, u8),
    HeaderLen(u64),
    Truncate(usize),
    Append(Vec<u8>),
    /// Replace a number in the header text with another (offsets, shape dims, lengths).
    Number(usize, u64),
    /// Duplicate the first tensor entry under the same name.
    Duplicate,
    Splice(usize, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::FlipByte(i, b)),
        prop_oneof![Just(u64::MAX), Just(u64::MAX / 2), Just(100_000_001u64), Just(0u64), 0u64..200]
            .prop_map(Mutation::HeaderLen),
        any::<usize>().prop_map(Mutation::Truncate),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        (
            any::<usize>(),
            prop_oneof![
                Just(u64::MAX),
                Just(1u64 << 32),
                Just(1u64 << 62),
                Just(i64::MAX as u64),
                0u64..64,
                Just(18_446_744_073_709_551_615u64)
            ]
        )
            .prop_map(|(i, v)| Mutation::Number(i, v)),
        Just(Mutation::Duplicate),
        (any::<usize>(), prop_oneof!["[\\[\\]{}\",:0-9-]{1,4}", "\\PC{1,3}"]).prop_map(|(i, s)| Mutation::Splice(i, s)),
    ]
}

fn mutate(header: &str, data_len: usize, m: &Mutation) -> Vec<u8> {
    let pick = |i: usize, n: usize| if n == 0 { 0 } else { i % n };
    match m {
        Mutation::FlipByte(i, b) => {
            let mut f = file_bytes(header, data_len);
            let at = pick(*i, f.len());
            f[at] ^= b | 1;
            f
        }
        Mutation::HeaderLen(n) => {
            let mut f = file_bytes(header, data_len);
            f[..8].copy_from_slice(&n.to_le_bytes());
            f
        }
        Mutation::Truncate(i) => {
            let mut f = file_bytes(header, data_len);
            f.truncate(pick(*i, f.len()));
            f
        }
        Mutation::Append(extra) => [file_bytes(header, data_len), extra.clone()].concat(),
        Mutation::Number(i, v) => {
            let digits: Vec<(usize, usize)> = header
                .char_indices()
                .filter(|(_, c)| c.is_ascii_digit())
                .map(|(k, _)| k)
                .fold(Vec::new(), |mut runs: Vec<(usize, usize)>, k| {
                    match runs.last_mut() {
                        Some(r) if r.1 == k => r.1 = k + 1,
                        _ => runs.push((k, k + 1)),
                    }
                    runs
                });
            if digits.is_empty() {
                return file_bytes(header, data_len);
            }
            let (s, e) = digits[pick(*i, digits.len())];
            let h = format!("{}{v}{}", &header[..s], &header[e..]);
            file_bytes(&h, data_len)
        }
        Mutation::Duplicate => {
            // {"a":{...},...} -> {"a":{...},"a":{...},...}
            let Some(end) = header.find('}') else { return file_bytes(header, data_len) };
            if header.len() < 3 {
                return file_bytes(header, data_len);
            }
            let first = &header[1..=end];
            let h = format!("{{{first},{}", &header[1..]);
            file_bytes(&h, data_len)
        }
        Mutation::Splice(i, s) => {
            let mut at = pick(*i, header.len() + 1);
            while !header.is_char_boundary(at) {
                at -= 1;
            }
            let h = format!("{}{s}{}", &header[..at], &header[at..]);
            file_bytes(&h, data_len)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(20000), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_reader(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let dir = tempfile::tempdir().unwrap();
        check_file(dir.path(), &bytes);
        // The same bytes after a plausible header length.
        let with_len = [&(bytes.len() as u64).to_le_bytes()[..], &bytes].concat();
        check_file(dir.path(), &with_len);
    }

    #[test]
    fn mutated_valid_files_never_panic_the_reader((header, data_len) in valid_header(), m in mutation()) {
        let dir = tempfile::tempdir().unwrap();
        // The unmutated file is accepted.
        let path = dir.path().join("ok.safetensors");
        std::fs::write(&path, file_bytes(&header, data_len)).unwrap();
        prop_assert!(SafetensorsFile::open(&path).is_ok(), "{header}");
        check_file(dir.path(), &mutate(&header, data_len, &m));
    }
}

/// Small real inputs for the plan fuzzer: two files of three F32 tensors and one I64 tensor.
fn plan_inputs(dir: &Path) {
    for (k, file) in ["a.safetensors", "b.safetensors"].iter().enumerate() {
        let vals: Vec<Vec<u8>> =
            (0..3).map(|t| (0..12).flat_map(|i| ((i * (t + 1) + k) as f32 * 0.1).to_le_bytes()).collect()).collect();
        let shapes = [vec![3usize, 4], vec![12], vec![2, 6]];
        let t: Vec<(&str, DType, &[usize], &[u8])> = ["w", "v", "u"]
            .iter()
            .zip(&shapes)
            .zip(&vals)
            .map(|((n, s), v)| (*n, DType::F32, s.as_slice(), v.as_slice()))
            .collect();
        write_safetensors(&dir.join(file), &t, &BTreeMap::new()).unwrap();
    }
}

fn valid_plan(dir: &Path) -> impl Strategy<Value = String> {
    let a = dir.join("a.safetensors").display().to_string();
    let b = dir.join("b.safetensors").display().to_string();
    let methods = ["linear", "ties", "dare_ties", "slerp", "della", "model_stock", "passthrough", "karcher", "sce"];
    (0..methods.len(), prop::sample::select(vec!["w", "v", "u"]), any::<bool>(), -2.0f64..2.0, 0.0f64..1.2).prop_map(
        move |(m, t, base, w, d)| {
            let shape = match t {
                "w" => "[3, 4]",
                "v" => "[12]",
                _ => "[2, 6]",
            };
            let base = if base { format!(r#""base": {{"file": "{a}", "tensor": "{t}"}},"#) } else { String::new() };
            format!(
                r#"{{"allow_nonfinite": false, "chunk_elems": 5, "shards": [{{"file": "out.safetensors", "tensors": [
                    {{"name": "{t}", "shape": {shape}, "out_dtype": "bfloat16",
                      "method": {{"name": "{}", "params": {{"t": 0.5}}}}, {base}
                      "inputs": [{{"file": "{a}", "tensor": "{t}", "weight": {w}, "density": {d}}},
                                 {{"file": "{b}", "tensor": "{t}", "weight": 1.0}}]}}]}}]}}"#,
                methods[m]
            )
        },
    )
}

/// Parse `json`; when accepted, execute it (errors are fine, panics are not).
fn check_plan(dir: &Path, json: &str) {
    if let Ok(plan) = Plan::from_json(json) {
        let out = dir.join("out");
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir(&out).unwrap();
        let _ = execute(&plan, &out, &ExecOptions { threads: Some(1), memory_limit: None }, &mut |_| Ok(()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(10000), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_the_plan_parser(s in "\\PC{0,200}") {
        let _ = Plan::from_json(&s);
    }

    #[test]
    fn mutated_valid_plans_never_panic_the_executor(
        (json, m) in {
            let dir = tempfile::tempdir().unwrap().keep();
            plan_inputs(&dir);
            (valid_plan(&dir), mutation()).prop_map(move |(j, m)| ((j, dir.clone()), m))
        }
    ) {
        let ((json, dir), m) = (json, m);
        // The unmutated plan parses.
        prop_assert!(Plan::from_json(&json).is_ok(), "{json}");
        check_plan(&dir, &json);
        let mutated = mutate(&json, 0, &m);
        if let Some(Ok(text)) = mutated.get(8..).map(std::str::from_utf8) {
            check_plan(&dir, text);
        }
    }
}

#[test]
fn corpus_replays_without_panics() {
    let dir = tempfile::tempdir().unwrap();
    plan_inputs(dir.path());
    let mut seen = 0;
    for entry in std::fs::read_dir(corpus()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => check_file(dir.path(), &bytes),
            Some("json") => {
                // `@DIR@` stands for the directory of the plan inputs.
                let text = String::from_utf8_lossy(&bytes).replace("@DIR@", &dir.path().display().to_string());
                check_plan(dir.path(), &text);
            }
            _ => continue,
        }
        seen += 1;
    }
    assert!(seen >= 10, "the corpus holds {seen} inputs");
}
