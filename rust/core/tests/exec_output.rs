//! The executor's output writer (`exec/writeback.rs`): merges staged a window at a time into stretches written
//! with direct I/O (windows smaller than a tensor, one window a tensor), non-float tensors copied piece by piece, on
//! a disk file system and on tmpfs (no direct I/O: every stretch through the page cache), under the default budget
//! and a 64 MiB one (smaller buffers, so more windows): every way gives the same file, byte for byte, and the
//! CRC-32 reported for it.

use std::collections::BTreeMap;
use std::path::Path;

use ferromerge_core::exec::{execute_with, Callbacks, ExecOptions, ShardDone};
use ferromerge_core::io::{write_safetensors, LayoutEntry, ShardLayout};
use ferromerge_core::plan::Plan;
use ferromerge_core::DType;

/// `(name, elements, output dtype)` per shard; sizes chosen so tensors start at unaligned offsets, stretches
/// fill and hand on, and `big`, `mid` and `t5` merge in several windows (of 8 MiB, or of 4 MiB under the 64 MiB
/// budget) that end at unaligned offsets.
const SHARDS: [&[(&str, usize, &str)]; 2] = [
    &[
        ("t0", 3, "bfloat16"),
        ("t1", 1001, "float32"),
        ("t2", 1_100_001, "bfloat16"),
        ("big", 5_000_000, "float32"),
        ("t3", 777, "bfloat16"),
        ("mid", 1_500_001, "float32"),
        ("int", 333, "I64"),
        ("t4", 5, "bfloat16"),
    ],
    &[("t5", 2_500_000, "bfloat16"), ("t6", 9, "float32")],
];

/// Whole numbers below 256: exact in bfloat16, so the merge (one input, weight 1) gives them back exactly.
fn values(name: &str, n: usize) -> Vec<f32> {
    let salt = name.bytes().map(usize::from).sum::<usize>();
    (0..n).map(|i| ((i * 31 + salt) % 251) as f32 - 100.0).collect()
}

fn encode(v: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => v.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect(),
        DType::F16 => unreachable!(),
    }
}

fn ints(n: usize) -> Vec<u8> {
    (0..n as i64).flat_map(|i| (i * 1_000_003 - 7).to_le_bytes()).collect()
}

/// The input file (every float tensor as f32, `int` as I64) and, per shard, the file the merge must write.
fn fixtures(dir: &Path) -> Vec<Vec<u8>> {
    let all: Vec<(&str, usize, &str)> = SHARDS.iter().flat_map(|s| s.iter().copied()).collect();
    let stored: Vec<(String, DType, Vec<usize>, Vec<u8>)> = all
        .iter()
        .filter(|t| t.2 != "I64")
        .map(|&(name, n, _)| (name.to_string(), DType::F32, vec![n], encode(&values(name, n), DType::F32)))
        .collect();
    let views: Vec<(&str, DType, &[usize], &[u8])> =
        stored.iter().map(|t| (t.0.as_str(), t.1, t.2.as_slice(), t.3.as_slice())).collect();
    write_safetensors(&dir.join("floats.safetensors"), &views, &BTreeMap::new()).unwrap();
    // The I64 tensor in a file of its own, written by hand (the writer above takes float dtypes only).
    let body = ints(333);
    let mut header = format!(r#"{{"int":{{"dtype":"I64","shape":[333],"data_offsets":[0,{}]}}}}"#, body.len());
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut raw = (header.len() as u64).to_le_bytes().to_vec();
    raw.extend(header.as_bytes());
    raw.extend(&body);
    std::fs::write(dir.join("ints.safetensors"), raw).unwrap();

    SHARDS
        .iter()
        .map(|shard| {
            let bytes: Vec<(&str, Vec<u8>)> = shard
                .iter()
                .map(|&(name, n, dt)| match dt {
                    "I64" => ("I64", ints(n)),
                    "bfloat16" => ("BF16", encode(&values(name, n), DType::BF16)),
                    _ => ("F32", encode(&values(name, n), DType::F32)),
                })
                .collect();
            // The expected file: the layout every safetensors writer here uses, then the tensors in order.
            let shapes: Vec<[usize; 1]> = shard.iter().map(|t| [t.1]).collect();
            let specs: Vec<LayoutEntry> = shard
                .iter()
                .zip(&bytes)
                .zip(&shapes)
                .map(|((t, (d, b)), s)| (t.0, *d, s.as_slice(), b.len() as u64))
                .collect();
            let layout = ShardLayout::new(&specs, &BTreeMap::new()).unwrap();
            let mut file = (layout.header.len() as u64).to_le_bytes().to_vec();
            file.extend(&layout.header);
            for (_, b) in &bytes {
                file.extend(b);
            }
            file
        })
        .collect()
}

fn plan(dir: &Path) -> Plan {
    let shards: Vec<String> = SHARDS
        .iter()
        .enumerate()
        .map(|(k, shard)| {
            let tensors: Vec<String> = shard
                .iter()
                .map(|&(name, n, dt)| {
                    let file = if dt == "I64" { "ints" } else { "floats" };
                    format!(
                        r#"{{"name": "{name}", "shape": [{n}], "out_dtype": "{dt}", "method": {{"name": "linear"}},
                            "inputs": [{{"file": "{}", "tensor": "{name}", "weight": 1.0}}]}}"#,
                        dir.join(format!("{file}.safetensors")).display()
                    )
                })
                .collect();
            format!(r#"{{"file": "out{k}.safetensors", "tensors": [{}]}}"#, tensors.join(","))
        })
        .collect();
    Plan::from_json(&format!(r#"{{"shards": [{}]}}"#, shards.join(","))).unwrap()
}

fn check(inputs: &Path, out_parent: &Path, expected: &[Vec<u8>]) {
    let plan = plan(inputs);
    for (limit, threads) in [(None, 2), (Some(64u64 << 20), 2), (Some(64u64 << 20), 1)] {
        let out = tempfile::tempdir_in(out_parent).unwrap();
        let mut done: Vec<(String, u64, u32)> = Vec::new();
        let mut shard_done = |d: &ShardDone| {
            done.push((d.file.to_string(), d.size, d.crc32));
            Ok(())
        };
        let mut callbacks = Callbacks { progress: &mut |_| Ok(()), shard_done: &mut shard_done };
        let opts = ExecOptions { threads: Some(threads), memory_limit: limit };
        execute_with(&plan, out.path(), &opts, None, &mut callbacks).unwrap();
        assert_eq!(done.len(), expected.len());
        for ((file, size, crc), want) in done.iter().zip(expected) {
            let got = std::fs::read(out.path().join(file)).unwrap();
            let at = got.iter().zip(want).position(|(a, b)| a != b);
            assert!(got == *want, "{file} (limit {limit:?}, {threads} threads): first difference at byte {at:?}");
            assert_eq!((*size, *crc), (want.len() as u64, crc32fast::hash(want)), "{file}");
        }
    }
}

#[test]
fn every_write_path_gives_the_same_file_and_its_crc() {
    let dir = tempfile::tempdir().unwrap();
    let expected = fixtures(dir.path());
    check(dir.path(), dir.path(), &expected);
}

/// tmpfs refuses direct I/O: the writer thread writes every stretch through the page cache instead.
#[test]
fn without_direct_io_the_file_is_the_same() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let expected = fixtures(dir.path());
    check(dir.path(), shm, &expected);
}
