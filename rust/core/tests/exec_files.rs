//! Whole plans over real files: a round trip through the writer and reader, and bad input that fails before
//! anything is written, with errors naming the file and tensor.

use std::collections::BTreeMap;
use std::path::Path;

use ferromerge_core::exec::{execute, ExecOptions};
use ferromerge_core::io::{write_safetensors, SafetensorsFile};
use ferromerge_core::plan::Plan;
use ferromerge_core::{CoreError, DType};

fn write(path: &Path, tensors: &[(&str, Vec<f32>, Vec<usize>)]) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.1.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(&str, DType, &[usize], &[u8])> =
        tensors.iter().zip(&bytes).map(|(t, b)| (t.0, DType::F32, t.2.as_slice(), b.as_slice())).collect();
    write_safetensors(path, &views, &BTreeMap::new()).unwrap();
}

fn plan_json(dir: &Path, tensor_b: &str, shape: &[usize]) -> String {
    format!(
        r#"{{"shards": [{{"file": "out.safetensors", "tensors": [{{
            "name": "w", "shape": {shape:?}, "out_dtype": "bfloat16",
            "method": {{"name": "task_arithmetic", "lambda": 2.0}},
            "base": {{"file": "{a}", "tensor": "w"}},
            "inputs": [{{"file": "{b}", "tensor": "{tensor_b}", "weight": 0.5}}]}}]}}]}}"#,
        a = dir.join("a.safetensors").display(),
        b = dir.join("b.safetensors").display(),
    )
}

#[test]
fn plan_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.safetensors"), &[("w", vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![2, 3])]);
    write(&dir.path().join("b.safetensors"), &[("w", vec![3.0, 2.0, 1.0, 4.0, 9.0, 6.0], vec![2, 3])]);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let plan = Plan::from_json(&plan_json(dir.path(), "w", &[2, 3])).unwrap();
    let mut calls = 0;
    let stats = execute(&plan, &out, &ExecOptions { threads: Some(2), memory_limit: None }, &mut |_| {
        calls += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!((stats.tensors, calls, stats.bytes_written), (1, 1, 12));
    let f = SafetensorsFile::open(&out.join("out.safetensors")).unwrap();
    let e = f.entry("w").unwrap();
    assert_eq!((e.dtype, e.shape.clone()), (Some(DType::BF16), vec![2, 3]));
    let got: Vec<f32> = f
        .read_bytes("w")
        .unwrap()
        .chunks_exact(2)
        .map(|c| ferromerge_core::dtype::bf16_to_f32(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    // base + lambda·weight·(b − a) = a + (b − a)
    assert_eq!(got, vec![3.0, 2.0, 1.0, 4.0, 9.0, 6.0]);
}

#[test]
fn bad_inputs_fail_before_writing_and_name_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.safetensors"), &[("w", vec![1.0; 6], vec![2, 3])]);
    write(&dir.path().join("b.safetensors"), &[("w", vec![1.0; 6], vec![3, 2])]);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let run = |json: String| {
        execute(
            &Plan::from_json(&json).unwrap(),
            &out,
            &ExecOptions { threads: Some(1), memory_limit: None },
            &mut |_| Ok(()),
        )
    };

    let e = run(plan_json(dir.path(), "w", &[2, 3])).unwrap_err();
    assert!(matches!(e, CoreError::Tensor { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("b.safetensors") && msg.contains("'w'") && msg.contains("[3, 2]"), "{msg}");

    let msg = run(plan_json(dir.path(), "missing", &[2, 3])).unwrap_err().to_string();
    assert!(msg.contains("b.safetensors") && msg.contains("'missing'") && msg.contains("not found"), "{msg}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "nothing written");

    // Truncated file, garbage header, header length beyond the file.
    let b = dir.path().join("b.safetensors");
    let full = std::fs::read(dir.path().join("a.safetensors")).unwrap();
    for (what, bytes) in [
        ("truncated", full[..full.len() - 3].to_vec()),
        ("garbage", [&16u64.to_le_bytes()[..], b"{not json at all"].concat()),
        ("long header", [&1000u64.to_le_bytes()[..], b"{}"].concat()),
        ("tiny", vec![1, 2, 3]),
    ] {
        std::fs::write(&b, bytes).unwrap();
        let e = run(plan_json(dir.path(), "w", &[2, 3])).unwrap_err();
        assert!(matches!(e, CoreError::Input { .. }), "{what}: {e}");
        assert!(e.to_string().contains("b.safetensors"), "{what}: {e}");
    }
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "nothing written");
}

#[test]
fn interrupt_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.safetensors"), &[("w", vec![1.0; 6], vec![2, 3])]);
    write(&dir.path().join("b.safetensors"), &[("w", vec![1.0; 6], vec![2, 3])]);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let plan = Plan::from_json(&plan_json(dir.path(), "w", &[2, 3])).unwrap();
    let e = execute(&plan, &out, &ExecOptions { threads: Some(1), memory_limit: None }, &mut |_| {
        Err(CoreError::External("interrupted".into()))
    })
    .unwrap_err();
    assert!(matches!(e, CoreError::External(ref inner) if inner.to_string() == "interrupted"));
}

/// A tensor larger than the budget's share takes the low-memory path (inputs streamed chunk by chunk from the
/// files, eager write-back, histogram selection instead of collected candidates): same bytes as an unlimited run.
#[test]
fn memory_limit_never_changes_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let n = 6_000_000usize; // 24 MB per f32 input: over a quarter of a 64 MiB budget
    let a: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
    let b: Vec<f32> = (0..n).map(|i| a[i] + ((i * 104729) % 211) as f32 * 1e-4 - 0.01).collect();
    write(&dir.path().join("a.safetensors"), &[("w", a, vec![n])]);
    write(&dir.path().join("b.safetensors"), &[("w", b, vec![n])]);
    let json = format!(
        r#"{{"shards": [{{"file": "out.safetensors", "tensors": [{{
            "name": "w", "shape": [{n}], "out_dtype": "float32",
            "method": {{"name": "ties", "normalize": true}},
            "base": {{"file": "{a}", "tensor": "w"}},
            "inputs": [{{"file": "{b}", "tensor": "w", "weight": 1.0, "density": 0.3}}]}}]}}]}}"#,
        a = dir.path().join("a.safetensors").display(),
        b = dir.path().join("b.safetensors").display(),
    );
    let plan = Plan::from_json(&json).unwrap();
    let mut outputs = Vec::new();
    for (name, limit) in [("unlimited", None), ("tight", Some(64u64 << 20))] {
        let out = dir.path().join(name);
        std::fs::create_dir(&out).unwrap();
        execute(&plan, &out, &ExecOptions { threads: Some(2), memory_limit: limit }, &mut |_| Ok(())).unwrap();
        outputs.push(std::fs::read(out.join("out.safetensors")).unwrap());
    }
    assert_eq!(outputs[0], outputs[1]);
    let e = execute(&plan, dir.path(), &ExecOptions { threads: Some(1), memory_limit: Some(1 << 20) }, &mut |_| Ok(()));
    assert!(e.unwrap_err().to_string().contains("too small"));
}
