//! The on-disk format: checksummed records in an append-only log, and snapshots.
//!
//! A frame is `[len: u32 LE][crc32: u32 LE][payload: len bytes]`, the CRC covering the
//! payload; a payload starts with the record's LSN (u64 LE) and a tag byte. The log file
//! holds frames with consecutive LSNs; a snapshot file is `SNAP_MAGIC` followed by frames
//! (`SnapHeader`, the state, `SnapEnd`) and is installed by atomic rename. On start,
//! [`scan_log`] reads frames until the first torn, corrupt or out-of-sequence one, and the
//! caller truncates the file there: a crash mid-append loses only unacknowledged writes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use std::sync::Arc;
use vha_core::storage::{Fence, MAX_KEY_LEN, MAX_LOCAL_VALUE_LEN};

use crate::error::StoreError;
use crate::lease::{Effect, EndReason};

/// Frame header: length + CRC.
pub const FRAME_HEADER: usize = 8;
/// Largest payload a valid frame can have: the largest value any `max_value_size` allows, the
/// largest key, a fence (lock key + token) and a few fixed fields. Anything larger is a
/// corrupt length field (a log written under a larger setting still recovers).
pub const MAX_PAYLOAD: usize = MAX_LOCAL_VALUE_LEN + 2 * MAX_KEY_LEN + 256;
/// First bytes of a snapshot file (format version 1).
pub const SNAP_MAGIC: &[u8; 8] = b"VHALKSN1";

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
const TAG_GRANT: u8 = 3;
const TAG_END: u8 = 4;
const TAG_OBSERVED: u8 = 5;
const TAG_SNAP_HEADER: u8 = 6;
const TAG_SNAP_END: u8 = 7;
const TAG_GRANTED_UP_TO: u8 = 8;

/// One durable record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A KV write; `revision` is the LSN it was logged with.
    Put {
        key: String,
        value: Arc<[u8]>,
        fence: Option<Fence>,
        revision: u64,
    },
    Delete {
        key: String,
        fence: Option<Fence>,
    },
    /// A lease effect: `Granted`, `Ended`, `Observed` or `GrantedUpTo` (never `Renewed`).
    Lease(Effect),
    /// First record of a snapshot: the LSN it covers up to.
    SnapHeader {
        lsn: u64,
    },
    /// Last record of a snapshot: how many records came between header and end.
    SnapEnd {
        count: u64,
    },
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_fence(out: &mut Vec<u8>, f: &Option<Fence>) {
    match f {
        None => out.push(0),
        Some(f) => {
            out.push(1);
            put_bytes(out, f.lock.as_bytes());
            out.extend_from_slice(&f.token.to_le_bytes());
        }
    }
}

/// Appends the framed encoding of `rec` with `lsn` to `out`.
pub fn encode(out: &mut Vec<u8>, lsn: u64, rec: &Record) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER]);
    out.extend_from_slice(&lsn.to_le_bytes());
    match rec {
        Record::Put {
            key,
            value,
            fence,
            revision,
        } => {
            out.push(TAG_PUT);
            put_bytes(out, key.as_bytes());
            put_bytes(out, value);
            put_fence(out, fence);
            out.extend_from_slice(&revision.to_le_bytes());
        }
        Record::Delete { key, fence } => {
            out.push(TAG_DELETE);
            put_bytes(out, key.as_bytes());
            put_fence(out, fence);
        }
        Record::Lease(Effect::Granted { key, value, token, ttl }) => {
            out.push(TAG_GRANT);
            put_bytes(out, key.as_bytes());
            put_bytes(out, value.as_bytes());
            out.extend_from_slice(&token.to_le_bytes());
            out.extend_from_slice(&(ttl.as_millis() as u64).to_le_bytes());
        }
        Record::Lease(Effect::Ended { key, token, reason }) => {
            out.push(TAG_END);
            put_bytes(out, key.as_bytes());
            out.extend_from_slice(&token.to_le_bytes());
            out.push(matches!(reason, EndReason::Expired) as u8);
        }
        Record::Lease(Effect::Observed { lock, token }) => {
            out.push(TAG_OBSERVED);
            put_bytes(out, lock.as_bytes());
            out.extend_from_slice(&token.to_le_bytes());
        }
        Record::Lease(Effect::GrantedUpTo { key, token }) => {
            out.push(TAG_GRANTED_UP_TO);
            put_bytes(out, key.as_bytes());
            out.extend_from_slice(&token.to_le_bytes());
        }
        Record::Lease(Effect::Renewed { .. }) => {
            // Renewals are in-memory only; callers never log them. Encode as a no-op
            // observation of token 0 so the stream stays well-formed.
            out.push(TAG_OBSERVED);
            put_bytes(out, b"");
            out.extend_from_slice(&0u64.to_le_bytes());
        }
        Record::SnapHeader { lsn } => {
            out.push(TAG_SNAP_HEADER);
            out.extend_from_slice(&lsn.to_le_bytes());
        }
        Record::SnapEnd { count } => {
            out.push(TAG_SNAP_END);
            out.extend_from_slice(&count.to_le_bytes());
        }
    }
    let payload_len = (out.len() - start - FRAME_HEADER) as u32;
    let crc = crc32fast::hash(&out[start + FRAME_HEADER..]);
    out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err("record shorter than its fields".into());
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        let n = u32::from_le_bytes(a) as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "key is not UTF-8".to_string())
    }
    fn fence(&mut self) -> Result<Option<Fence>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(Fence {
                lock: self.string()?,
                token: self.u64()?,
            })),
            t => Err(format!("bad fence flag {t}")),
        }
    }
}

/// Decodes one payload (without the frame header) into `(lsn, record)`.
pub fn decode_payload(payload: &[u8]) -> Result<(u64, Record), String> {
    let mut c = Cursor { b: payload };
    let lsn = c.u64()?;
    let rec = match c.u8()? {
        TAG_PUT => Record::Put {
            key: c.string()?,
            value: Arc::from(c.bytes()?),
            fence: c.fence()?,
            revision: c.u64()?,
        },
        TAG_DELETE => Record::Delete {
            key: c.string()?,
            fence: c.fence()?,
        },
        TAG_GRANT => Record::Lease(Effect::Granted {
            key: c.string()?,
            value: c.string()?,
            token: c.u64()?,
            ttl: Duration::from_millis(c.u64()?),
        }),
        TAG_END => Record::Lease(Effect::Ended {
            key: c.string()?,
            token: c.u64()?,
            reason: if c.u8()? == 1 {
                EndReason::Expired
            } else {
                EndReason::Released
            },
        }),
        TAG_OBSERVED => Record::Lease(Effect::Observed {
            lock: c.string()?,
            token: c.u64()?,
        }),
        TAG_GRANTED_UP_TO => Record::Lease(Effect::GrantedUpTo {
            key: c.string()?,
            token: c.u64()?,
        }),
        TAG_SNAP_HEADER => Record::SnapHeader { lsn: c.u64()? },
        TAG_SNAP_END => Record::SnapEnd { count: c.u64()? },
        t => return Err(format!("unknown record tag {t}")),
    };
    if !c.b.is_empty() {
        return Err("trailing bytes in record".into());
    }
    Ok((lsn, rec))
}

/// Result of reading frames from a byte buffer.
pub struct Scan {
    pub records: Vec<(u64, Record)>,
    /// Offset just past the last good frame (truncate the file here).
    pub good_len: usize,
    /// Why reading stopped before the end, if it did.
    pub stopped: Option<String>,
}

/// Reads frames from `buf` until the end or the first bad frame. With `after_lsn`, records
/// must continue the sequence (`lsn == previous + 1`; records at or below `after_lsn` are
/// skipped as already covered by a snapshot).
pub fn scan(buf: &[u8], after_lsn: Option<u64>) -> Scan {
    let mut off = 0;
    let mut records = Vec::new();
    // Sequence checking only for logs (`after_lsn` set); snapshot frames share one LSN.
    let mut last = after_lsn;
    let stopped = loop {
        if off == buf.len() {
            break None;
        }
        if buf.len() - off < FRAME_HEADER {
            break Some(format!("torn frame header at offset {off}"));
        }
        let mut l = [0u8; 4];
        l.copy_from_slice(&buf[off..off + 4]);
        let len = u32::from_le_bytes(l) as usize;
        let mut c = [0u8; 4];
        c.copy_from_slice(&buf[off + 4..off + 8]);
        let crc = u32::from_le_bytes(c);
        if len > MAX_PAYLOAD {
            break Some(format!("implausible frame length {len} at offset {off}"));
        }
        if buf.len() - off - FRAME_HEADER < len {
            break Some(format!("torn frame at offset {off} ({len} bytes announced)"));
        }
        let payload = &buf[off + FRAME_HEADER..off + FRAME_HEADER + len];
        if crc32fast::hash(payload) != crc {
            break Some(format!("checksum mismatch at offset {off}"));
        }
        let (lsn, rec) = match decode_payload(payload) {
            Ok(r) => r,
            Err(e) => break Some(format!("undecodable record at offset {off}: {e}")),
        };
        if let (Some(after), Some(prev)) = (after_lsn, last) {
            if records.is_empty() && lsn <= after {
                off += FRAME_HEADER + len;
                continue; // covered by the snapshot (crash between snapshot and truncate)
            }
            if lsn != prev + 1 {
                break Some(format!("record {lsn} at offset {off} does not follow {prev}"));
            }
            last = Some(lsn);
        }
        records.push((lsn, rec));
        off += FRAME_HEADER + len;
    };
    Scan {
        records,
        good_len: off,
        stopped,
    }
}

/// Parses and verifies a whole snapshot: magic, checksums, header first, end last with the
/// right count. Returns the LSN it covers and the state records.
pub fn parse_snapshot(buf: &[u8]) -> Result<(u64, Vec<Record>), String> {
    let body = buf
        .strip_prefix(SNAP_MAGIC.as_slice())
        .ok_or("not a lockd snapshot (bad magic)")?;
    let s = scan(body, None);
    if let Some(why) = s.stopped {
        return Err(why);
    }
    let mut recs = s.records.into_iter().map(|(_, r)| r);
    let lsn = match recs.next() {
        Some(Record::SnapHeader { lsn }) => lsn,
        _ => return Err("snapshot does not start with a header".into()),
    };
    let mut out: Vec<Record> = recs.collect();
    match out.pop() {
        Some(Record::SnapEnd { count }) if count == out.len() as u64 => Ok((lsn, out)),
        _ => Err("snapshot is incomplete (no end record or wrong count)".into()),
    }
}

/// Builds a snapshot file image from state records, in memory (the tests' reference for
/// [`SnapshotWriter`], which streams).
#[cfg(test)]
pub(crate) fn build_snapshot(lsn: u64, records: impl Iterator<Item = Record>) -> Vec<u8> {
    let mut out = SNAP_MAGIC.to_vec();
    encode(&mut out, lsn, &Record::SnapHeader { lsn });
    let mut count = 0u64;
    for r in records {
        encode(&mut out, lsn, &r);
        count += 1;
    }
    encode(&mut out, lsn, &Record::SnapEnd { count });
    out
}

/// Writes a snapshot as a stream of frames (no image in memory): the magic and header on
/// creation, one frame per [`SnapshotWriter::push`], the end record on
/// [`SnapshotWriter::finish`].
pub struct SnapshotWriter<W: Write> {
    out: W,
    lsn: u64,
    count: u64,
    buf: Vec<u8>,
    written: u64,
}

impl<W: Write> SnapshotWriter<W> {
    pub fn new(mut out: W, lsn: u64) -> std::io::Result<SnapshotWriter<W>> {
        let mut buf = SNAP_MAGIC.to_vec();
        encode(&mut buf, lsn, &Record::SnapHeader { lsn });
        out.write_all(&buf)?;
        let written = buf.len() as u64;
        buf.clear();
        Ok(SnapshotWriter {
            out,
            lsn,
            count: 0,
            buf,
            written,
        })
    }

    pub fn push(&mut self, rec: &Record) -> std::io::Result<()> {
        self.buf.clear();
        encode(&mut self.buf, self.lsn, rec);
        self.out.write_all(&self.buf)?;
        self.written += self.buf.len() as u64;
        self.count += 1;
        Ok(())
    }

    /// Writes the end record; returns the output and the snapshot's size in bytes.
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        self.buf.clear();
        encode(&mut self.buf, self.lsn, &Record::SnapEnd { count: self.count });
        self.out.write_all(&self.buf)?;
        self.out.flush()?;
        Ok((self.out, self.written + self.buf.len() as u64))
    }
}

/// Reads one frame from `r`: `Ok(None)` at a clean end of input, `Err` with why on a torn,
/// corrupt or undecodable frame (nothing of that frame is returned).
fn read_frame(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Option<(u64, Record, usize)>, String> {
    let mut head = [0u8; FRAME_HEADER];
    let mut got = 0;
    while got < FRAME_HEADER {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err("torn frame header".into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read error: {e}")),
        }
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_PAYLOAD {
        return Err(format!("implausible frame length {len}"));
    }
    payload.resize(len, 0);
    r.read_exact(payload)
        .map_err(|_| format!("torn frame ({len} bytes announced)"))?;
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    let (lsn, rec) = decode_payload(payload).map_err(|e| format!("undecodable record: {e}"))?;
    Ok(Some((lsn, rec, FRAME_HEADER + len)))
}

/// Streams a whole snapshot from `r`, handing each state record to `apply`; verifies the
/// magic, the header first, the end record last with the right count, and nothing after.
/// Returns the LSN it covers. On `Err` some records may have been applied: the caller
/// discards that state.
pub fn read_snapshot(mut r: impl Read, mut apply: impl FnMut(Record)) -> Result<u64, String> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|_| "not a lockd snapshot (too short)".to_string())?;
    if &magic != SNAP_MAGIC {
        return Err("not a lockd snapshot (bad magic)".into());
    }
    let mut payload = Vec::new();
    let lsn = match read_frame(&mut r, &mut payload)? {
        Some((_, Record::SnapHeader { lsn }, _)) => lsn,
        _ => return Err("snapshot does not start with a header".into()),
    };
    let mut count = 0u64;
    loop {
        match read_frame(&mut r, &mut payload)? {
            None => return Err("snapshot is incomplete (no end record)".into()),
            Some((_, Record::SnapEnd { count: c }, _)) => {
                if c != count {
                    return Err(format!("snapshot end says {c} records, {count} were read"));
                }
                break;
            }
            Some((_, Record::SnapHeader { .. }, _)) => return Err("second snapshot header".into()),
            Some((_, rec, _)) => {
                apply(rec);
                count += 1;
            }
        }
    }
    match read_frame(&mut r, &mut payload) {
        Ok(None) => Ok(lsn),
        _ => Err("bytes after the snapshot's end record".into()),
    }
}

/// Like [`scan`] on a log, but streaming from `r` and handing records to `apply` as they are
/// read: stops at the end or at the first torn, corrupt or out-of-sequence frame. Records at
/// or below `after_lsn` at the start are skipped. Returns the offset just past the last good
/// frame, the last LSN applied (or `after_lsn`), and why reading stopped early, if it did.
pub fn scan_reader(mut r: impl Read, after_lsn: u64, mut apply: impl FnMut(u64, Record)) -> (u64, u64, Option<String>) {
    let (mut off, mut last, mut started) = (0u64, after_lsn, false);
    let mut payload = Vec::new();
    loop {
        match read_frame(&mut r, &mut payload) {
            Ok(None) => return (off, last, None),
            Err(why) => return (off, last, Some(format!("{why} at offset {off}"))),
            Ok(Some((lsn, rec, n))) => {
                if !started && lsn <= after_lsn {
                    off += n as u64;
                    continue;
                }
                if lsn != last + 1 {
                    return (
                        off,
                        last,
                        Some(format!("record {lsn} at offset {off} does not follow {last}")),
                    );
                }
                started = true;
                apply(lsn, rec);
                last = lsn;
                off += n as u64;
            }
        }
    }
}

/// Writes `data` to `path` atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| StoreError::io(tmp.display(), e))?;
    f.write_all(data).map_err(|e| StoreError::io(tmp.display(), e))?;
    f.sync_all().map_err(|e| StoreError::io(tmp.display(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| StoreError::io(path.display(), e))?;
    sync_dir(path)
}

/// Fsyncs the directory holding `path`, so a rename or create is durable.
pub fn sync_dir(path: &Path) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir.display(), e))
}

/// Opens the log for appending after truncating it to `len` (dropping a torn tail).
pub fn open_log_at(path: &Path, len: u64) -> Result<File, StoreError> {
    let f = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(|e| StoreError::io(path.display(), e))?;
    let cur = f.metadata().map_err(|e| StoreError::io(path.display(), e))?.len();
    if cur != len {
        f.set_len(len).map_err(|e| StoreError::io(path.display(), e))?;
        f.sync_all().map_err(|e| StoreError::io(path.display(), e))?;
    }
    sync_dir(path)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::Put {
                key: "a/b".into(),
                value: Arc::from(&b"\x00\x01v"[..]),
                fence: Some(Fence {
                    lock: "core/lock".into(),
                    token: 3,
                }),
                revision: 1,
            },
            Record::Delete {
                key: "a/b".into(),
                fence: None,
            },
            Record::Lease(Effect::Granted {
                key: "l".into(),
                value: "v".into(),
                token: 9,
                ttl: Duration::from_millis(1500),
            }),
            Record::Lease(Effect::Ended {
                key: "l".into(),
                token: 9,
                reason: EndReason::Expired,
            }),
            Record::Lease(Effect::Observed {
                lock: "l".into(),
                token: 12,
            }),
            Record::Lease(Effect::GrantedUpTo {
                key: "l".into(),
                token: 9,
            }),
        ]
    }

    fn log_of(recs: &[Record]) -> Vec<u8> {
        let mut buf = Vec::new();
        for (i, r) in recs.iter().enumerate() {
            encode(&mut buf, i as u64 + 1, r);
        }
        buf
    }

    /// Every record kind round-trips through encode/scan.
    #[test]
    fn round_trip() {
        let recs = sample();
        let s = scan(&log_of(&recs), Some(0));
        assert!(s.stopped.is_none());
        assert_eq!(s.records.into_iter().map(|(_, r)| r).collect::<Vec<_>>(), recs);
    }

    /// A single flipped bit anywhere in a frame is caught by the checksum (or the length
    /// check): the scan stops before that frame and keeps every earlier one.
    #[test]
    fn checksum_catches_corruption() {
        let recs = sample();
        let buf = log_of(&recs);
        let mut first_len = Vec::new();
        encode(&mut first_len, 1, &recs[0]);
        for pos in first_len.len()..buf.len() {
            let mut bad = buf.clone();
            bad[pos] ^= 0x10;
            let s = scan(&bad, Some(0));
            assert!(s.stopped.is_some(), "flip at {pos} not detected");
            assert!(
                !s.records.is_empty() && s.records[0].1 == recs[0],
                "records before the flip survive"
            );
        }
    }

    /// A log cut at any byte (a torn tail) yields exactly the complete frames before the cut,
    /// and `good_len` points at the end of the last complete one.
    #[test]
    fn torn_tail_at_every_offset() {
        let recs = sample();
        let buf = log_of(&recs);
        let mut ends = vec![0];
        let mut tmp = Vec::new();
        for (i, r) in recs.iter().enumerate() {
            encode(&mut tmp, i as u64 + 1, r);
            ends.push(tmp.len());
        }
        for cut in 0..=buf.len() {
            let s = scan(&buf[..cut], Some(0));
            let complete = ends.iter().filter(|e| **e <= cut).count() - 1;
            assert_eq!(s.records.len(), complete, "cut at {cut}");
            assert_eq!(s.good_len, ends[complete]);
        }
    }

    /// Records already covered by the snapshot are skipped; a gap in the sequence stops.
    #[test]
    fn lsn_sequence() {
        let recs = sample();
        let buf = log_of(&recs);
        let s = scan(&buf, Some(2));
        assert_eq!(s.records.iter().map(|r| r.0).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
        let s = scan(&buf, Some(10));
        assert!(s.records.is_empty() && s.stopped.is_none());
    }

    /// Snapshots verify their header, end record and count.
    #[test]
    fn snapshot_round_trip_and_truncation() {
        let recs = sample();
        let img = build_snapshot(42, recs.clone().into_iter());
        assert_eq!(parse_snapshot(&img).unwrap(), (42, recs));
        assert!(
            parse_snapshot(&img[..img.len() - 3]).is_err(),
            "truncated snapshot rejected"
        );
        assert!(parse_snapshot(b"garbage").is_err());
    }

    /// The streaming snapshot writer and reader agree with the in-memory image format, and
    /// the reader refuses a truncated stream or bytes after the end.
    #[test]
    fn streamed_snapshot_matches_image() {
        let recs = sample();
        let mut w = SnapshotWriter::new(Vec::new(), 42).unwrap();
        for r in &recs {
            w.push(r).unwrap();
        }
        let (img, size) = w.finish().unwrap();
        assert_eq!(img, build_snapshot(42, recs.clone().into_iter()));
        assert_eq!(size, img.len() as u64);
        let mut got = Vec::new();
        assert_eq!(read_snapshot(&img[..], |r| got.push(r)), Ok(42));
        assert_eq!(got, recs);
        for cut in [img.len() - 1, img.len() / 2, 9, 3] {
            assert!(read_snapshot(&img[..cut], |_| {}).is_err(), "cut at {cut} accepted");
        }
        let mut more = img.clone();
        more.extend_from_slice(&img[8..]);
        assert!(read_snapshot(&more[..], |_| {}).is_err());
    }

    /// The streaming log scan finds the same records, good length and stop reason class as
    /// the buffer scan, for a log cut at every offset and one with a gap.
    #[test]
    fn streamed_scan_matches_buffer_scan() {
        let buf = log_of(&sample());
        for cut in 0..=buf.len() {
            let want = scan(&buf[..cut], Some(0));
            let mut got = Vec::new();
            let (good, last, stopped) = scan_reader(&buf[..cut], 0, |lsn, r| got.push((lsn, r)));
            assert_eq!(got, want.records, "cut at {cut}");
            assert_eq!(good as usize, want.good_len);
            assert_eq!(last, got.last().map(|r| r.0).unwrap_or(0));
            assert_eq!(stopped.is_some(), want.stopped.is_some());
        }
        let (_, last, stopped) = scan_reader(&buf[..], 2, |_, _| {});
        assert_eq!((last, stopped), (6, None));
        let (_, last, stopped) = scan_reader(&buf[..], 10, |_, _| {});
        assert_eq!((last, stopped), (10, None), "fully covered log");
    }

    proptest::proptest! {
        /// Arbitrary bytes (a garbage log or snapshot file) never panic the decoder: scanning
        /// stops at the first bad frame, and good frames before it are kept.
        #[test]
        fn garbage_never_panics(junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut buf = Vec::new();
            encode(&mut buf, 1, &sample()[0]);
            let good = buf.len();
            buf.extend_from_slice(&junk);
            let s = scan(&buf, Some(0));
            proptest::prop_assert!(s.good_len >= good);
            let _ = scan(&junk, None);
            let _ = parse_snapshot(&junk);
            let _ = decode_payload(&junk);
        }
    }
}
