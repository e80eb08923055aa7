//! The executor's contracts with its callers (docs: CONTRACTS R1–R5): non-float tensors copied byte for byte,
//! NaN and infinity stopped unless allowed, inputs truncated or changed during the run reported by file and
//! tensor, and each finished shard reported with its size and CRC-32.

use std::path::{Path, PathBuf};

use ferromerge_core::exec::{execute, execute_with, Callbacks, ExecOptions, ShardDone};
use ferromerge_core::plan::Plan;
use ferromerge_core::CoreError;

/// A safetensors file of raw tensors `(name, dtype, shape, bytes)`, written by hand (any dtype).
fn write_raw(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut pos = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + bytes.len()]}),
        );
        pos += bytes.len();
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for t in tensors {
        out.extend(&t.3);
    }
    std::fs::write(path, out).unwrap();
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn out_dir(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir(&out).unwrap();
    out
}

fn opts(threads: usize) -> ExecOptions {
    ExecOptions { threads: Some(threads), memory_limit: None }
}

/// One linear tensor per name over files a and b, into one shard.
fn linear_plan(dir: &Path, names: &[&str], n: usize, extra: &str) -> Plan {
    let tensors: Vec<String> = names
        .iter()
        .map(|t| {
            format!(
                r#"{{"name": "{t}", "shape": [{n}], "out_dtype": "float32", "method": {{"name": "linear"}},
                    "inputs": [{{"file": "{a}", "tensor": "{t}", "weight": 0.5}},
                               {{"file": "{b}", "tensor": "{t}", "weight": 0.5}}]}}"#,
                a = dir.join("a.safetensors").display(),
                b = dir.join("b.safetensors").display(),
            )
        })
        .collect();
    Plan::from_json(&format!(
        r#"{{{extra} "shards": [{{"file": "out.safetensors", "tensors": [{}]}}]}}"#,
        tensors.join(",")
    ))
    .unwrap()
}

#[test]
fn non_float_tensors_are_copied_byte_for_byte_and_never_merged() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37)).collect(); // 5 I64 values
    let flags = vec![1u8, 0, 1];
    write_raw(
        &dir.path().join("a.safetensors"),
        &[("ids", "I64", vec![5], ids.clone()), ("flags", "BOOL", vec![3], flags.clone())],
    );
    let a = dir.path().join("a.safetensors");
    let json = format!(
        r#"{{"shards": [{{"file": "out.safetensors", "tensors": [
            {{"name": "ids", "shape": [5], "out_dtype": "I64", "method": {{"name": "passthrough"}},
              "inputs": [{{"file": "{a}", "tensor": "ids", "weight": 1.0}}]}},
            {{"name": "flags", "shape": [3], "out_dtype": "bool", "method": {{"name": "linear"}},
              "inputs": [{{"file": "{a}", "tensor": "flags", "weight": 1.0}}]}}]}}]}}"#,
        a = a.display()
    );
    let out = out_dir(dir.path(), "out");
    execute(&Plan::from_json(&json).unwrap(), &out, &opts(2), &mut |_| Ok(())).unwrap();
    let f = ferromerge_core::io::SafetensorsFile::open(&out.join("out.safetensors")).unwrap();
    assert_eq!(f.entry("ids").unwrap().dtype_name, "I64");
    assert_eq!(f.read_bytes("ids").unwrap(), ids);
    assert_eq!(f.entry("flags").unwrap().dtype_name, "BOOL");
    assert_eq!(f.read_bytes("flags").unwrap(), flags);

    // Anything but a plain copy of one input into its own dtype is refused, naming the file and the tensor.
    for (method, out_dtype, inputs) in
        [("ties", "I64", 1), ("passthrough", "float32", 1), ("passthrough", "I32", 1), ("linear", "I64", 2)]
    {
        let ins: Vec<String> =
            (0..inputs).map(|_| format!(r#"{{"file": "{}", "tensor": "ids", "weight": 1.0}}"#, a.display())).collect();
        let json = format!(
            r#"{{"shards": [{{"file": "o.safetensors", "tensors": [
                {{"name": "ids", "shape": [5], "out_dtype": "{out_dtype}", "method": {{"name": "{method}"}},
                  "inputs": [{}]}}]}}]}}"#,
            ins.join(",")
        );
        let out = out_dir(dir.path(), &format!("bad-{method}-{out_dtype}-{inputs}"));
        let e = execute(&Plan::from_json(&json).unwrap(), &out, &opts(1), &mut |_| Ok(())).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, CoreError::Tensor { .. }), "{method} {out_dtype}: {msg}");
        assert!(msg.contains("a.safetensors") && msg.contains("'ids'") && msg.contains("I64"), "{msg}");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "nothing written");
    }
}

#[test]
fn nonfinite_inputs_stop_the_run_unless_allowed_and_then_flow_through() {
    let dir = tempfile::tempdir().unwrap();
    // 2 × 8.8 MB of inputs: above the 16 MiB read-ahead share of a 64 MiB budget.
    let n = 2_200_000;
    let a: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
    let mut b = a.clone();
    b[7] = f32::NAN;
    b[n - 1] = f32::NAN;
    b[1000] = f32::NEG_INFINITY;
    write_raw(&dir.path().join("a.safetensors"), &[("w", "F32", vec![n], f32s(&a))]);
    write_raw(&dir.path().join("b.safetensors"), &[("w", "F32", vec![n], f32s(&b))]);
    // Read whole (default budget) and streamed (a budget whose share the tensor exceeds).
    for limit in [None, Some(64u64 << 20)] {
        let plan = linear_plan(dir.path(), &["w"], n, "");
        let out = out_dir(dir.path(), &format!("stop-{limit:?}"));
        let o = ExecOptions { threads: Some(2), memory_limit: limit };
        let e = execute(&plan, &out, &o, &mut |_| Ok(())).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, CoreError::Tensor { .. }), "{msg}");
        assert!(msg.contains("b.safetensors") && msg.contains("'w'"), "{msg}");
        assert!(msg.contains("2 NaN and 1 infinite values; pass --allow-nonfinite"), "{msg}");
    }
    let mut outputs = Vec::new();
    for (threads, chunk) in [(1, 1000), (2, 65536), (2, 777)] {
        let plan = linear_plan(dir.path(), &["w"], n, &format!(r#""allow_nonfinite": true, "chunk_elems": {chunk},"#));
        let out = out_dir(dir.path(), &format!("allow-{threads}-{chunk}"));
        execute(&plan, &out, &opts(threads), &mut |_| Ok(())).unwrap();
        outputs.push(std::fs::read(out.join("out.safetensors")).unwrap());
    }
    assert!(outputs.iter().all(|o| *o == outputs[0]), "same bytes at any thread count and chunking");
    let f = ferromerge_core::io::SafetensorsFile::open(&dir.path().join("allow-1-1000/out.safetensors")).unwrap();
    let got: Vec<f32> =
        f.read_bytes("w").unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(got[7].is_nan() && got[n - 1].is_nan());
    assert_eq!(got[1000], f32::NEG_INFINITY);
    assert_eq!(got[8], 0.5 * a[8] + 0.5 * b[8]);
}

#[test]
fn an_input_truncated_during_the_run_is_an_error_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["w1", "w2", "w3", "w4"];
    // Read whole, and streamed (2 × 8.8 MB per tensor: above the read-ahead share of a 64 MiB budget).
    for (limit, n) in [(None, 200_000), (Some(64u64 << 20), 2_200_000)] {
        let t: Vec<(&str, &str, Vec<usize>, Vec<u8>)> =
            names.iter().map(|nm| (*nm, "F32", vec![n], f32s(&vec![1.0; n]))).collect();
        write_raw(&dir.path().join("a.safetensors"), &t);
        write_raw(&dir.path().join("b.safetensors"), &t);
        let plan = linear_plan(dir.path(), &names, n, "");
        let out = out_dir(dir.path(), &format!("trunc-{limit:?}"));
        let b = dir.path().join("b.safetensors");
        let o = ExecOptions { threads: Some(2), memory_limit: limit };
        let e = execute(&plan, &out, &o, &mut |p| {
            if p.tensors_done == 1 {
                // Cut the file inside w3's data: w2 may already be read ahead, w3 and w4 are not.
                let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
                f.set_len(std::fs::metadata(&b).unwrap().len() - (n as u64 * 4 + 100)).unwrap();
            }
            Ok(())
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, CoreError::Tensor { .. }), "{msg}");
        assert!(msg.contains("b.safetensors") && msg.contains("'w3'"), "{msg}");
        assert!(msg.contains("changed while the merge was reading it") && msg.contains("truncated"), "{msg}");
    }
}

#[test]
fn an_input_changed_during_the_run_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let n = 1000;
    let t = [("w1", "F32", vec![n], f32s(&vec![1.0; n])), ("w2", "F32", vec![n], f32s(&vec![2.0; n]))];
    write_raw(&dir.path().join("a.safetensors"), &t);
    let b = dir.path().join("b.safetensors");
    for (k, how) in ["rewritten in place", "replaced"].iter().enumerate() {
        write_raw(&b, &t);
        let plan = linear_plan(dir.path(), &["w1", "w2"], n, "");
        let out = out_dir(dir.path(), &format!("changed-{k}"));
        let e = execute(&plan, &out, &opts(1), &mut |p| {
            if p.tensors_done == 1 {
                if k == 0 {
                    // Same size, new contents: the modification time moves.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    let mut bytes = std::fs::read(&b).unwrap();
                    let last = bytes.len() - 1;
                    bytes[last] ^= 1;
                    std::fs::write(&b, bytes).unwrap();
                } else {
                    let tmp = dir.path().join("new.safetensors");
                    std::fs::copy(&b, &tmp).unwrap();
                    std::fs::rename(&tmp, &b).unwrap();
                }
            }
            Ok(())
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, CoreError::Input { .. }), "{how}: {msg}");
        assert!(
            msg.contains("b.safetensors") && msg.contains("changed while the merge was reading it"),
            "{how}: {msg}"
        );
    }
}

#[test]
fn each_finished_shard_is_reported_with_its_size_and_crc32() {
    let dir = tempfile::tempdir().unwrap();
    let n = 150_000;
    let names = ["w1", "w2", "w3"];
    let t: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = names
        .iter()
        .enumerate()
        .map(|(k, nm)| (*nm, "F32", vec![n], f32s(&(0..n).map(|i| (i * (k + 1)) as f32).collect::<Vec<_>>())))
        .collect();
    write_raw(&dir.path().join("a.safetensors"), &t);
    write_raw(&dir.path().join("b.safetensors"), &t);
    let tensor = |nm: &str| {
        format!(
            r#"{{"name": "{nm}", "shape": [{n}], "out_dtype": "bfloat16", "method": {{"name": "linear"}},
                "inputs": [{{"file": "{a}", "tensor": "{nm}", "weight": 0.25}},
                           {{"file": "{b}", "tensor": "{nm}", "weight": 0.75}}]}}"#,
            a = dir.path().join("a.safetensors").display(),
            b = dir.path().join("b.safetensors").display(),
        )
    };
    let json = format!(
        r#"{{"chunk_elems": 4096, "shards": [{{"file": "one.safetensors", "tensors": [{}, {}]}},
                                             {{"file": "two.safetensors", "tensors": [{}]}}]}}"#,
        tensor("w1"),
        tensor("w2"),
        tensor("w3")
    );
    let plan = Plan::from_json(&json).unwrap();
    let out = out_dir(dir.path(), "out");
    let mut done: Vec<(String, u64, u32)> = Vec::new();
    let mut shard_done = |d: &ShardDone| {
        // Reported after the file is whole: its bytes on disk are final.
        let bytes = std::fs::read(out.join(d.file)).unwrap();
        assert_eq!(bytes.len() as u64, d.size);
        done.push((d.file.to_string(), d.size, d.crc32));
        Ok(())
    };
    let mut callbacks = Callbacks { progress: &mut |_| Ok(()), shard_done: &mut shard_done };
    execute_with(&plan, &out, &opts(2), None, &mut callbacks).unwrap();
    assert_eq!(done.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(), ["one.safetensors", "two.safetensors"]);
    for (file, size, crc) in done {
        let bytes = std::fs::read(out.join(&file)).unwrap();
        assert_eq!((bytes.len() as u64, crc32fast::hash(&bytes)), (size, crc), "{file}");
    }
    // An error from the callback stops the run.
    let out2 = out_dir(dir.path(), "out2");
    let mut callbacks =
        Callbacks { progress: &mut |_| Ok(()), shard_done: &mut |_| Err(CoreError::External("journal full".into())) };
    let e = execute_with(&plan, &out2, &opts(1), None, &mut callbacks).unwrap_err();
    assert_eq!(e.to_string(), "journal full");
}

#[test]
fn a_fifo_directory_or_device_as_a_shard_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for path in [fifo, dir.path().to_path_buf(), PathBuf::from("/dev/zero")] {
        let e = ferromerge_core::io::SafetensorsFile::open(&path).err().expect("refused");
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
