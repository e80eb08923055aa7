//! Writing the output files.
//!
//! Every tensor is staged: its bytes go into an aligned in-memory stretch of its file that holds the bytes before
//! it in file order (the header first, then consecutive tensors), and a writer thread writes each filled stretch
//! with direct I/O (`O_DIRECT`) while the next tensors merge. A merge's final pass fills the stretch a window of
//! whole chunks at a time ([`StagedSink`]), in file order, so the two staging buffers stay a few MiB whatever the
//! tensor's size (a 128256×8192 embedding included); a copy fills it piece by piece. Direct I/O skips the page
//! cache: no copy of the output into it, no dirty pages for the kernel to account, write back and drop (on the 300M
//! family's 0.67 GB output, writing through the page cache and pushing it out again cost the merge about 0.6 s of
//! system time; direct writes of the same bytes about 0.1 s). Direct I/O takes only whole 4 KiB blocks at aligned
//! offsets: the unaligned end of a stretch stays staged as the start of the next one, and the unaligned end of the
//! file goes through the page cache. Where the file system refuses direct I/O (tmpfs), the writer thread writes the
//! same stretches through the page cache and waits for each to reach the disk before dropping it from memory, so
//! the output never accumulates there either.
//!
//! The file's CRC-32 costs no second read: the writer thread hashes each stretch as it writes it; the pieces are
//! combined in file order.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;

use crate::error::{CoreError, Result};
use crate::merge::Sink;

/// The block size direct I/O needs (offsets, lengths and buffer addresses): 4 KiB covers 512-byte and 4 KiB
/// logical blocks.
pub(crate) const ALIGN: usize = 4096;

/// A stretch is handed to the writer thread once it holds this many bytes (or when the next tensor would not
/// fit): large enough that a direct write is efficient, small enough that small tensors reach the disk early.
pub(crate) const STRETCH: usize = 8 << 20;

/// The CRC-32 pieces of one output file, combined in file order once the file is whole.
#[derive(Default)]
struct Pieces(Vec<(u64, u64, crc32fast::Hasher)>);

impl Pieces {
    /// The CRC-32 of the whole file; the pieces must tile `[0, total)` exactly (an internal error otherwise: a
    /// byte written twice or never).
    fn finish(mut self, path: &Path, total: u64) -> Result<u32> {
        self.0.sort_unstable_by_key(|p| p.0);
        let mut all = crc32fast::Hasher::new();
        let mut at = 0u64;
        for (off, len, h) in &self.0 {
            if *off != at {
                return Err(CoreError::Internal(format!("{}: output byte {at} written {}", path.display(), {
                    if *off < at {
                        "twice"
                    } else {
                        "never"
                    }
                })));
            }
            all.combine(h);
            at += len;
        }
        if at != total {
            return Err(CoreError::Internal(format!("{}: {at} of {total} output bytes written", path.display())));
        }
        Ok(all.finalize())
    }
}

/// One output file as the writers see it: the ordinary descriptor, and a second one opened for direct I/O when
/// the file system takes it.
pub(crate) struct OutFile<'a> {
    pub(crate) file: &'a File,
    pub(crate) path: &'a Path,
    direct: Option<File>,
    /// Cleared when a direct write is refused after all (`EINVAL`): the rest goes through the page cache.
    direct_ok: AtomicBool,
}

impl<'a> OutFile<'a> {
    pub(crate) fn new(file: &'a File, path: &'a Path) -> Self {
        // Refused (EINVAL) by file systems without direct I/O, e.g. tmpfs: then every write is buffered.
        let direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok();
        OutFile { file, path, direct_ok: AtomicBool::new(direct.is_some()), direct }
    }

    /// Without direct I/O (what a file system that refuses it gets).
    #[cfg(test)]
    fn buffered(file: &'a File, path: &'a Path) -> Self {
        OutFile { file, path, direct: None, direct_ok: AtomicBool::new(false) }
    }

    fn err(&self, e: &std::io::Error) -> CoreError {
        CoreError::output(self.path, e.to_string())
    }

    /// Write `bytes` at `off` through the page cache and wait until they are on disk, then drop them from memory.
    fn write_buffered(&self, off: u64, bytes: &[u8]) -> Result<()> {
        self.file.write_all_at(bytes, off).map_err(|e| self.err(&e))?;
        finish_writeback(self.file, off, bytes.len() as u64);
        Ok(())
    }

    /// Write a stretch: its aligned interior directly, its unaligned edges (or all of it, without direct I/O)
    /// through the page cache.
    fn write_stretch(&self, off: u64, bytes: &[u8]) -> Result<()> {
        let end = off + bytes.len() as u64;
        let (a, b) = (off.next_multiple_of(ALIGN as u64), end / ALIGN as u64 * ALIGN as u64);
        let direct = self.direct.as_ref().filter(|_| self.direct_ok.load(Ordering::Relaxed) && b > a);
        let Some(direct) = direct else { return self.write_buffered(off, bytes) };
        let at = |x: u64| (x - off) as usize;
        match direct.write_all_at(&bytes[at(a)..at(b)], a) {
            Ok(()) => {}
            // A file system (or a device with larger blocks) that opened the file for direct I/O but refuses
            // the write: the page cache it is, from now on.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct_ok.store(false, Ordering::Relaxed);
                return self.write_buffered(off, bytes);
            }
            Err(e) => return Err(self.err(&e)),
        }
        if a > off {
            self.write_buffered(off, &bytes[..at(a)])?;
        }
        if end > b {
            self.write_buffered(b, &bytes[at(b)..])?;
        }
        Ok(())
    }
}

/// Memory for one stretch: anonymous pages (zeroed, page-aligned as direct I/O needs), mapped once and reused.
pub(crate) struct StageBuf {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: the buffer is owned memory with no thread affinity; it is handed between threads by value.
unsafe impl Send for StageBuf {}

impl StageBuf {
    fn new(cap: usize, path: &Path) -> Result<Self> {
        let cap = cap.next_multiple_of(ALIGN);
        // SAFETY: a fresh private anonymous mapping; no memory of ours is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            return Err(CoreError::output(path, format!("cannot allocate a {cap}-byte output buffer: {e}")));
        }
        // SAFETY: advice on the mapping just made; contents unaffected (fewer page faults where the kernel allows).
        unsafe { libc::madvise(ptr, cap, libc::MADV_HUGEPAGE) };
        Ok(StageBuf { ptr: ptr.cast(), cap })
    }

    fn bytes(&self, len: usize) -> &[u8] {
        assert!(len <= self.cap);
        // SAFETY: in bounds of the mapping, which is initialised (zeroed at mapping) and owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, len) }
    }

    fn bytes_mut(&mut self, range: std::ops::Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.cap);
        // SAFETY: as above, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

impl Drop for StageBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.cap) };
    }
}

/// A filled stretch on its way to the writer thread.
pub(crate) struct Stretch<'a> {
    out: &'a OutFile<'a>,
    buf: StageBuf,
    off: u64,
    len: usize,
}

/// A stretch written (or not), with its buffer back for reuse.
pub(crate) struct Written {
    buf: StageBuf,
    piece: Result<(u64, u64, crc32fast::Hasher)>,
}

/// The writer thread's loop: write each stretch in the order sent, hash it, send the buffer back. It ends when the
/// sending side is dropped; it blocks (never spins) while it waits.
pub(crate) fn writer(stretches: &Receiver<Stretch>, written: &Sender<Written>) {
    for s in stretches {
        let bytes = s.buf.bytes(s.len);
        let piece = s.out.write_stretch(s.off, bytes).map(|()| {
            let mut h = crc32fast::Hasher::new();
            h.update(bytes);
            (s.off, s.len as u64, h)
        });
        if written.send(Written { buf: s.buf, piece }).is_err() {
            return;
        }
    }
}

/// The merging side of the staged output: the current stretch, the buffers (two: one filling while the other is
/// written), and the file's CRC pieces.
pub(crate) struct Stager<'a> {
    to_writer: Sender<Stretch<'a>>,
    from_writer: Receiver<Written>,
    cap: usize,
    free: Vec<StageBuf>,
    buffers: usize,
    in_flight: usize,
    /// The current file, its stretch (buffer, file offset of its first byte, bytes held) and its CRC pieces.
    out: Option<&'a OutFile<'a>>,
    stage: Option<(StageBuf, u64, usize)>,
    pieces: Pieces,
}

impl<'a> Stager<'a> {
    /// `cap`: bytes of each of the two buffers (a merge's output is staged when it fits one with a block to spare).
    pub(crate) fn new(to_writer: Sender<Stretch<'a>>, from_writer: Receiver<Written>, cap: usize) -> Self {
        Stager {
            to_writer,
            from_writer,
            cap: cap.next_multiple_of(ALIGN),
            free: Vec::new(),
            buffers: 0,
            in_flight: 0,
            out: None,
            stage: None,
            pieces: Pieces::default(),
        }
    }

    /// Elements of `elem_size` bytes in a window of a merge's final pass: what a buffer holds beside the block of
    /// an unaligned stretch end ([`StagedSink`]).
    pub(crate) fn window_elems(&self, elem_size: usize) -> usize {
        ((self.cap - ALIGN) / elem_size.max(1)).max(1)
    }

    /// Start an output file whose bytes before the first tensor are `head` (its header, already written by
    /// `ShardLayout::create`), staged as the start of the first stretch.
    pub(crate) fn begin(&mut self, out: &'a OutFile<'a>, head: &[u8]) -> Result<()> {
        self.out = Some(out);
        self.pieces = Pieces::default();
        self.restart(0)?;
        // A header longer than a buffer (tens of thousands of tensors) is staged piece by piece like a copy.
        self.stage_pieces(0, head.len() as u64, |at, buf| {
            buf.copy_from_slice(&head[at..at + buf.len()]);
            Ok(())
        })
    }

    /// Append a tensor of `len` bytes at file offset `off` piece by piece, in file order: `fill(at, piece)` writes
    /// its bytes `[at, at + piece.len())` (a byte copy, which produces its bytes in order). The tensor need not fit
    /// a buffer: full stretches go to the writer as they fill, so a copy of any size is staged and a run of copies
    /// touches no more than a stretch and a piece of each buffer.
    pub(crate) fn stage_pieces(
        &mut self,
        off: u64,
        len: u64,
        mut fill: impl FnMut(usize, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.continue_at(off)?;
        // Pieces small enough to stay in the cache between the read that fills one and the NaN/Inf count that
        // scans it. After a hand-on a buffer holds less than a block, so a piece of cap − block bytes always fits.
        let piece = (256 << 10).min(self.cap - ALIGN);
        let len = usize::try_from(len).map_err(|_| CoreError::Internal("tensor larger than memory".into()))?;
        let mut at = 0;
        while at < len {
            let n = piece.min(len - at);
            self.append(n, |b| fill(at, b))?;
            at += n;
        }
        Ok(())
    }

    /// Write out everything staged (at the end of the file, and before a tensor that does not follow on).
    pub(crate) fn flush(&mut self) -> Result<()> {
        if let Some((buf, off, len)) = self.stage.take() {
            self.send(buf, off, len)?;
        }
        Ok(())
    }

    /// End the file: everything written (not yet fsynced), the CRC-32 of its `total` bytes.
    pub(crate) fn finish(&mut self, total: u64) -> Result<u32> {
        self.flush()?;
        while self.in_flight > 0 {
            self.receive()?;
        }
        let out = self.out.take().expect("begin before finish");
        std::mem::take(&mut self.pieces).finish(out.path, total)
    }

    /// Append `len` bytes to the stretch, written by `fill`; hands the stretch on when it is long enough.
    fn append(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> Result<()>) -> Result<()> {
        let room = self.room(len)?;
        // SAFETY: `room` points at `len` bytes of the current stretch's buffer, inside its mapping, which nothing
        // else touches until `commit` (the buffer is owned by `self`, borrowed mutably here).
        fill(unsafe { std::slice::from_raw_parts_mut(room, len) })?;
        self.commit(len)
    }

    /// The address of `len` bytes at the end of the stretch (handed on first when it has no room). A window larger
    /// than a buffer (a chunk of rows longer than a buffer) gets a buffer of its own, freed once written.
    fn room(&mut self, len: usize) -> Result<*mut u8> {
        let (buf, _, held) = self.stage.as_ref().expect("a stretch is open");
        if held + len > buf.cap {
            self.hand_on()?;
        }
        let (buf, _, held) = self.stage.as_mut().expect("a stretch is open");
        if *held + len > buf.cap {
            let mut big = StageBuf::new(*held + len, self.out.expect("a file is open").path)?;
            big.bytes_mut(0..*held).copy_from_slice(buf.bytes(*held));
            let small = std::mem::replace(buf, big);
            self.recycle(small);
        }
        let (buf, _, held) = self.stage.as_mut().expect("a stretch is open");
        Ok(buf.bytes_mut(*held..*held + len).as_mut_ptr())
    }

    /// The `len` bytes made room for are filled: they are part of the stretch now.
    fn commit(&mut self, len: usize) -> Result<()> {
        let (_, _, held) = self.stage.as_mut().expect("a stretch is open");
        *held += len;
        if *held >= STRETCH {
            self.hand_on()?;
        }
        Ok(())
    }

    /// A buffer back in the free list, or unmapped when it was made for one large window.
    fn recycle(&mut self, buf: StageBuf) {
        if buf.cap == self.cap {
            self.free.push(buf);
        }
    }

    /// Send the stretch's whole blocks to the writer and start the next stretch with its unaligned end.
    fn hand_on(&mut self) -> Result<()> {
        let (buf, off, len) = self.stage.take().expect("a stretch is open");
        let end = off + len as u64;
        let cut = (end / ALIGN as u64 * ALIGN as u64).max(off);
        let mut next = self.buffer()?;
        let tail = (end - cut) as usize;
        next.bytes_mut(0..tail).copy_from_slice(&buf.bytes(len)[(cut - off) as usize..]);
        self.stage = Some((next, cut, tail));
        if cut > off {
            self.send(buf, off, (cut - off) as usize)?;
        } else {
            self.recycle(buf);
        }
        Ok(())
    }

    /// Go on in the current stretch when it ends at file offset `off`; otherwise write it out and start a new one
    /// at `off` (after a tensor that was not staged).
    fn continue_at(&mut self, off: u64) -> Result<()> {
        let contiguous = self.stage.as_ref().is_some_and(|(_, at, held)| at + *held as u64 == off);
        if !contiguous {
            self.flush()?;
            self.restart(off)?;
        }
        Ok(())
    }

    fn restart(&mut self, off: u64) -> Result<()> {
        let buf = self.buffer()?;
        self.stage = Some((buf, off, 0));
        Ok(())
    }

    fn send(&mut self, buf: StageBuf, off: u64, len: usize) -> Result<()> {
        let out = self.out.expect("a file is open");
        if self.to_writer.send(Stretch { out, buf, off, len }).is_err() {
            return Err(CoreError::Internal("the output writer thread ended early".into()));
        }
        self.in_flight += 1;
        Ok(())
    }

    /// A free buffer: a returned one, a new one (two at most), or the next the writer hands back (waiting).
    fn buffer(&mut self) -> Result<StageBuf> {
        if let Some(b) = self.free.pop() {
            return Ok(b);
        }
        if self.buffers < 2 {
            self.buffers += 1;
            return StageBuf::new(self.cap, self.out.expect("a file is open").path);
        }
        self.receive()?;
        Ok(self.free.pop().expect("a buffer came back"))
    }

    /// Wait for one stretch to be written; its buffer goes back to the free list, a write error to the caller.
    fn receive(&mut self) -> Result<()> {
        let w =
            self.from_writer.recv().map_err(|_| CoreError::Internal("the output writer thread ended early".into()))?;
        self.in_flight -= 1;
        self.recycle(w.buf);
        self.pieces.0.push(w.piece?);
        Ok(())
    }
}

/// A merge's output staged a window at a time ([`Sink::window_elems`]): each window's chunks are put (from any
/// worker, in any order) straight into the stretch, and the window joins it when the pass closes it, so full
/// stretches are written while the next window merges. `put` outside an open window is a bug (a panic, which the
/// merge reports as an internal error naming the tensor).
pub(crate) struct StagedSink<'s, 'a> {
    stager: Mutex<&'s mut Stager<'a>>,
    /// The tensor's file offset and element size.
    off: u64,
    elem_size: usize,
    /// The open window: its first element, its bytes, and the address they are staged at (`0`: none open).
    window: Mutex<(usize, usize, usize)>,
}

impl<'s, 'a> StagedSink<'s, 'a> {
    pub(crate) fn new(stager: &'s mut Stager<'a>, off: u64, elem_size: usize) -> Self {
        StagedSink { stager: Mutex::new(stager), off, elem_size, window: Mutex::new((0, 0, 0)) }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sink for StagedSink<'_, '_> {
    fn window_elems(&self) -> Option<usize> {
        Some(lock(&self.stager).window_elems(self.elem_size))
    }

    fn begin_window(&self, start: usize, len: usize) -> Result<()> {
        let bytes = len * self.elem_size;
        let mut stager = lock(&self.stager);
        stager.continue_at(self.off + (start * self.elem_size) as u64)?;
        let at = stager.room(bytes)?;
        *lock(&self.window) = (start, bytes, at as usize);
        Ok(())
    }

    fn put(&self, elem_start: usize, bytes: &[u8]) -> Result<()> {
        // SAFETY: the range is this put's own (disjoint from every other put), written at once, inside the window.
        unsafe { self.place(elem_start, bytes.len()) }.expect("a staged window").copy_from_slice(bytes);
        Ok(())
    }

    unsafe fn place(&self, elem_start: usize, len: usize) -> Option<&mut [u8]> {
        let (start, bytes, at) = *lock(&self.window);
        let from = elem_start.checked_sub(start).map(|e| e * self.elem_size);
        assert!(at != 0 && from.is_some_and(|f| f + len <= bytes), "output put outside its window");
        let from = from.unwrap_or(0);
        // SAFETY: in the window's room (checked above), which stays valid until `end_window` (the stager makes no
        // room and hands nothing on meanwhile: its lock is only taken by `begin_window` and `end_window`, which the
        // final pass calls around the window's chunks); the caller asks for disjoint ranges (the trait's contract).
        Some(unsafe { std::slice::from_raw_parts_mut((at as *mut u8).add(from), len) })
    }

    fn end_window(&self) -> Result<()> {
        let (_, len, _) = std::mem::take(&mut *lock(&self.window));
        lock(&self.stager).commit(len)
    }
}

/// File offsets and lengths as the syscalls take them (`off_t`); output files are far below 2^63 bytes.
fn off_t(v: u64) -> libc::off_t {
    v as libc::off_t
}

/// Wait until a written range is on disk, then drop it from the page cache.
pub(crate) fn finish_writeback(file: &File, off: u64, len: u64) {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: as above; both calls are advisory for correctness (the final fsync makes the data durable).
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off_t(off), off_t(len), flags);
        libc::posix_fadvise(file.as_raw_fd(), off_t(off), off_t(len), libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How a tensor is staged: merged in windows of this many bytes, or copied.
    #[derive(Clone, Copy)]
    enum How {
        Merge(usize),
        Copy,
    }

    /// Tensors of these sizes (bytes) after a 13-byte head, with buffers of a stretch and a block (what a run
    /// with a few workers gets): windows smaller than a buffer, as large as one, and larger (its own buffer).
    const TENSORS: [(usize, How); 10] = [
        (3, How::Merge(3)),
        (5000, How::Merge(1000)),
        (STRETCH - 100, How::Merge(1 << 20)),
        (300_001, How::Copy),
        (17, How::Merge(5)),
        (3 * ALIGN, How::Merge(ALIGN)),
        (2 * STRETCH + 7, How::Copy),
        (1, How::Merge(1)),
        (2 * STRETCH + 11, How::Merge(2 * STRETCH + 11)),
        (9, How::Merge(4)),
    ];

    fn byte(i: usize) -> u8 {
        (i * 131 % 251) as u8
    }

    /// Stage the tensors the way the executor does (a merge's chunks put in reverse order within each window, as
    /// threads may) and return the file's bytes and the CRC-32 the stager computed.
    fn run(direct: bool) -> (Vec<u8>, u32, usize) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let total = 13 + TENSORS.iter().map(|t| t.0).sum::<usize>();
        let file = File::create(&path).unwrap();
        file.set_len(total as u64).unwrap();
        let out = if direct { OutFile::new(&file, &path) } else { OutFile::buffered(&file, &path) };
        let head: Vec<u8> = (0..13).map(byte).collect();
        let (to_writer, stretches) = std::sync::mpsc::channel();
        let (written, from_writer) = std::sync::mpsc::channel();
        let crc = std::thread::scope(|scope| {
            scope.spawn(move || writer(&stretches, &written));
            let mut stager = Stager::new(to_writer, from_writer, STRETCH + ALIGN);
            assert_eq!(stager.window_elems(2), STRETCH / 2);
            stager.begin(&out, &head).unwrap();
            let mut off = 13;
            for (len, how) in TENSORS {
                let data: Vec<u8> = (off..off + len).map(byte).collect();
                match how {
                    How::Merge(window) => {
                        let sink = StagedSink::new(&mut stager, off as u64, 1);
                        for w in (0..len).step_by(window) {
                            let end = len.min(w + window);
                            sink.begin_window(w, end - w).unwrap();
                            for start in (w..end).step_by(1000).rev() {
                                sink.put(start, &data[start..end.min(start + 1000)]).unwrap();
                            }
                            sink.end_window().unwrap();
                        }
                    }
                    How::Copy => stager
                        .stage_pieces(off as u64, len as u64, |at, buf| {
                            buf.copy_from_slice(&data[at..at + buf.len()]);
                            Ok(())
                        })
                        .unwrap(),
                }
                off += len;
            }
            stager.finish(total as u64).unwrap()
        });
        drop(file);
        (std::fs::read(&path).unwrap(), crc, total)
    }

    #[test]
    #[should_panic(expected = "outside its window")]
    fn a_put_outside_the_open_window_is_a_bug() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = File::create(&path).unwrap();
        let out = OutFile::buffered(&file, &path);
        let (to_writer, _stretches) = std::sync::mpsc::channel();
        let (_written, from_writer) = std::sync::mpsc::channel();
        let mut stager = Stager::new(to_writer, from_writer, STRETCH + ALIGN);
        stager.begin(&out, b"head").unwrap();
        let sink = StagedSink::new(&mut stager, 4, 2);
        sink.begin_window(10, 5).unwrap();
        let _ = sink.put(14, &[0; 4]);
    }

    #[test]
    fn stretches_direct_or_buffered_write_every_byte_once_with_the_file_crc() {
        for direct in [true, false] {
            let (got, crc, total) = run(direct);
            let want: Vec<u8> = (0..total).map(byte).collect();
            assert!(
                got == want,
                "direct {direct}: first difference at {:?}",
                got.iter().zip(&want).position(|(a, b)| a != b)
            );
            assert_eq!(crc, crc32fast::hash(&want), "direct {direct}");
        }
    }

    #[test]
    fn a_byte_missing_from_the_pieces_is_an_internal_error() {
        let mut p = Pieces::default();
        let mut h = crc32fast::Hasher::new();
        h.update(b"abc");
        p.0.push((0, 3, h));
        assert!(p.finish(Path::new("x"), 4).unwrap_err().to_string().contains("3 of 4"));
    }
}
