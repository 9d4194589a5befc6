//! The tuning database: every candidate's measurement, as JSON lines, in
//! the user's cache folder.
//!
//! ```text
//! {"format":"bitnet-tuning","version":1}
//! {"key":"ternary_matmul n=2560 k=2560","phase":"decode","fingerprint":"cpu-…","threads":2,"space":1,"tiles":{…},"ns":81234,"status":"ok","at":1795000000}
//! ```
//!
//! A record is identified by (workload key, phase, fingerprint, threads,
//! search-space version, tiles); a newer measurement replaces an older one.
//! Writers take a lock file, re-read the file, merge, write a temporary
//! file and rename it into place, so two tuners at once lose nothing.
//! A line that does not parse is reported and skipped; a file that is not
//! a tuning database of this version is reported and ignored, and moved
//! aside (never deleted) the next time the database is written.

use crate::space::{Phase, SPACE_VERSION};
use bitnet_codegen::cpu::ternary::{Packing, TernaryTiles};
use bitnet_codegen::cpu::Isa;
use bitnet_codegen::cuda::{CudaTiles, PhaseTiles};
use bitnet_codegen::schedule::{TileSource, Tiles, WorkloadKey};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

const FORMAT: &str = "bitnet-tuning";
const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub key: WorkloadKey,
    pub phase: Phase,
    pub fingerprint: String,
    pub threads: usize,
    pub space: u32,
    pub tiles: Tiles,
    /// Median time in nanoseconds, for a timed candidate.
    pub ns: Option<u64>,
    /// `ok`, `wrong: why`, or `not timed`.
    pub status: String,
    /// When it was measured, in seconds since 1970.
    pub at: u64,
}

impl Record {
    fn same_slot(&self, o: &Record) -> bool {
        self.key == o.key
            && self.phase == o.phase
            && self.fingerprint == o.fingerprint
            && self.threads == o.threads
            && self.space == o.space
            && self.tiles == o.tiles
    }

    pub fn is_ok(&self) -> bool {
        self.status == "ok" && self.ns.is_some()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct FileHeader {
    format: String,
    version: u32,
}

/// What was read: the usable records, and what was wrong with the rest.
#[derive(Debug, Default)]
pub struct Loaded {
    pub records: Vec<Record>,
    pub problems: Vec<String>,
    /// The file exists but is not a database of this version.
    foreign: bool,
}

pub struct Database {
    pub path: PathBuf,
}

impl Loaded {
    /// Whether the file was a database of this version (a missing file is
    /// an empty one); a foreign file is ignored and moved aside on write.
    pub fn is_usable(&self) -> bool {
        !self.foreign
    }
}

impl Database {
    /// `$BITNET_CACHE_DIR/tuning.jsonl`, else `$XDG_CACHE_HOME/bitnet/…`,
    /// else `~/.cache/bitnet/…`.
    pub fn default_path() -> Result<PathBuf, String> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let dir = var("BITNET_CACHE_DIR")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("bitnet")))
            .or_else(|| var("HOME").map(|h| h.join(".cache/bitnet")))
            .ok_or("no cache folder: set BITNET_CACHE_DIR (or XDG_CACHE_HOME or HOME)")?;
        Ok(dir.join("tuning.jsonl"))
    }

    pub fn open_default() -> Result<Database, String> {
        Ok(Database { path: Self::default_path()? })
    }

    pub fn at(path: impl Into<PathBuf>) -> Database {
        Database { path: path.into() }
    }

    /// Reads every record; never fails (a missing file is empty).
    pub fn load(&self) -> Loaded {
        read(&self.path)
    }

    /// Adds `new` to the database, replacing older measurements of the
    /// same candidates, without losing what another process wrote since.
    pub fn merge(&self, new: &[Record]) -> Result<(), String> {
        self.locked(|current| {
            let mut all = current.records;
            for r in new {
                match all.iter_mut().find(|o| o.same_slot(r)) {
                    Some(o) => *o = r.clone(),
                    None => all.push(r.clone()),
                }
            }
            Some(all)
        })
    }

    /// Removes every record; returns how many there were.
    pub fn clear(&self) -> Result<usize, String> {
        let mut n = 0;
        self.locked(|current| {
            n = current.records.len();
            Some(Vec::new())
        })?;
        Ok(n)
    }

    /// Writes every record to `to` (a database file of its own).
    pub fn export(&self, to: &Path) -> Result<usize, String> {
        let loaded = self.load();
        write_atomically(to, &loaded.records)?;
        Ok(loaded.records.len())
    }

    /// Merges the records of `from`; returns how many, and its problems.
    pub fn import(&self, from: &Path) -> Result<(usize, Vec<String>), String> {
        if !from.is_file() {
            return Err(format!("{}: no such file", from.display()));
        }
        let loaded = read(from);
        if loaded.foreign {
            return Err(loaded.problems.join("; "));
        }
        self.merge(&loaded.records)?;
        Ok((loaded.records.len(), loaded.problems))
    }

    /// Runs `f` on the current contents under the lock; writes what it returns.
    fn locked(&self, f: impl FnOnce(Loaded) -> Option<Vec<Record>>) -> Result<(), String> {
        let err = |what: &str, e: std::io::Error| format!("{what} {}: {e}", self.path.display());
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err("creating the folder of", e))?;
        }
        let lock_path = self.path.with_extension("lock");
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| err("locking", e))?;
        lock.lock().map_err(|e| err("locking", e))?;
        let current = read(&self.path);
        if current.foreign {
            let aside = self.path.with_extension(format!("jsonl.bad-{}", now()));
            std::fs::rename(&self.path, &aside).map_err(|e| err("moving aside", e))?;
        }
        let result = match f(current) {
            Some(records) => write_atomically(&self.path, &records),
            None => Ok(()),
        };
        let _ = lock.unlock();
        result
    }

    /// The measurements of this machine and thread count, as a tile source.
    pub fn source(&self, fingerprint: &str, threads: usize) -> (Tuned, Vec<String>) {
        let loaded = self.load();
        (Tuned::new(loaded.records, fingerprint, threads), loaded.problems)
    }

    /// The measurements of the GPU with this fingerprint.
    pub fn cuda_source(&self, fingerprint: &str) -> (CudaTuned, Vec<String>) {
        let loaded = self.load();
        (CudaTuned::new(&loaded.records, fingerprint), loaded.problems)
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn read(path: &Path) -> Loaded {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::default(),
        Err(e) => return Loaded { problems: vec![format!("{}: {e}; tuning records ignored", path.display())], ..Default::default() },
    };
    let mut lines = text.lines().enumerate();
    let header = lines.next().and_then(|(_, l)| serde_json::from_str::<FileHeader>(l).ok());
    match header {
        Some(h) if h.format == FORMAT && h.version == VERSION => {}
        None if text.trim().is_empty() => return Loaded::default(),
        h => {
            let what = match h {
                Some(h) if h.format == FORMAT => format!("a version {} tuning database (this build reads version {VERSION})", h.version),
                _ => "not a bitnet tuning database".into(),
            };
            return Loaded { records: Vec::new(), problems: vec![format!("{} is {what}; ignored (re-run `bitnet autotune`)", path.display())], foreign: true };
        }
    }
    let mut loaded = Loaded::default();
    let mut bad = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => loaded.records.push(r),
            Err(e) => bad.push(format!("line {}: {e}", i + 1)),
        }
    }
    if !bad.is_empty() {
        let more = if bad.len() > 3 { format!(" and {} more", bad.len() - 3) } else { String::new() };
        loaded.problems.push(format!("{}: {} unreadable records skipped ({}{more})", path.display(), bad.len(), bad[..bad.len().min(3)].join("; ")));
    }
    loaded
}

fn write_atomically(path: &Path, records: &[Record]) -> Result<(), String> {
    let err = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let tmp = path.with_extension(format!("tmp{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
    let result = (|| -> Result<(), String> {
        let mut f = std::io::BufWriter::new(File::create(&tmp).map_err(err)?);
        let header = serde_json::to_string(&FileHeader { format: FORMAT.into(), version: VERSION }).map_err(|e| e.to_string())?;
        writeln!(f, "{header}").map_err(err)?;
        for r in records {
            writeln!(f, "{}", serde_json::to_string(r).map_err(|e| e.to_string())?).map_err(err)?;
        }
        f.into_inner().map_err(|e| err(e.into_error()))?.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The best measured tiles per workload for one machine and thread count.
///
/// A ternary matmul's rows per tile fix its weight layout, shared by decode
/// and prefill: they (and the ISA) come from the fastest decode candidate,
/// the memory-bound phase that dominates generation; tokens per step from
/// the fastest prefill candidate with that layout.
pub struct Tuned {
    best: HashMap<WorkloadKey, Tiles>,
    /// The calibration's choice for batched steps of many sequences.
    batch: Option<Tiles>,
}

impl Tuned {
    pub fn new(records: Vec<Record>, fingerprint: &str, threads: usize) -> Tuned {
        let mine: Vec<&Record> =
            records.iter().filter(|r| r.fingerprint == fingerprint && r.threads == threads && r.space == SPACE_VERSION && r.is_ok()).collect();
        let fastest = |key: &WorkloadKey, phase: Phase, fits: &dyn Fn(&Tiles) -> bool| {
            mine.iter().filter(|r| &r.key == key && r.phase == phase && fits(&r.tiles)).min_by_key(|r| r.ns).map(|r| r.tiles)
        };
        let mut best = HashMap::new();
        let keys: std::collections::BTreeSet<&WorkloadKey> = mine.iter().map(|r| &r.key).collect();
        for key in keys {
            let any = |_: &Tiles| true;
            let tiles = match layout(&mine, key, Phase::Decode, Isa::best()) {
                Some(Tiles::Ternary(d)) => {
                    let same_layout = |t: &Tiles| matches!(t, Tiles::Ternary(p) if p.rows == d.rows && p.packing == d.packing && p.isa == d.isa);
                    match fastest(key, Phase::Prefill, &same_layout) {
                        Some(Tiles::Ternary(p)) => Tiles::Ternary(p),
                        _ => Tiles::Ternary(d),
                    }
                }
                Some(t) => t,
                None => match fastest(key, Phase::Prefill, &any) {
                    Some(t) => t,
                    None => continue,
                },
            };
            best.insert(key.clone(), tiles);
        }
        let batch = layout(&mine, &crate::calibrate::key(), Phase::Batch, Isa::best());
        Tuned { best, batch }
    }

    pub fn contains(&self, key: &WorkloadKey) -> bool {
        self.best.contains_key(key)
    }

    /// Whether this machine and thread count have been calibrated (for
    /// batched steps too, where there is a choice to make for them).
    pub fn is_calibrated(&self) -> bool {
        self.contains(&crate::calibrate::key()) && (self.batch.is_some() || crate::calibrate::batch_candidates().is_empty())
    }

    /// The same tiles for an engine that steps many sequences at once: the
    /// ternary products without tiles of their own take the packing the
    /// calibration found fastest for a batched step, not for one token.
    pub fn for_batches(mut self) -> Tuned {
        if let Some(b) = self.batch {
            self.best.insert(crate::calibrate::key(), b);
        }
        self
    }

    /// The calibration's choice for batched steps, if it measured them.
    pub fn batch_default(&self) -> Option<TernaryTiles> {
        match self.batch {
            Some(Tiles::Ternary(t)) => Some(t),
            _ => None,
        }
    }
}

/// How much faster, in percent, a layout must be than the default (2 bits,
/// the CPU's best ISA) to be chosen instead, in decode (or, for engines of
/// many sequences, in a batched step). The layout serves every phase, and
/// the others are slower elsewhere: on a Zen 4 with
/// AVX-512 VBMI, 1.6 bits ran prefill 13% and an 8-sequence batched step
/// 30% slower than 2 bits, for a decode product 7-14% faster; AVX2 kernels
/// decode as fast as VNNI ones once both wait on memory, and prefill at
/// half their speed. Where decode waits on memory alone (many cores sharing
/// it) the 1.6-bit product approaches its 20% fewer bytes and wins.
pub const LAYOUT_MARGIN: u64 = 15;

/// The layout of `key` in `phase`: its fastest candidate, unless that one
/// is not [`LAYOUT_MARGIN`] faster than the fastest of the default layout
/// (2 bits on `isa`, else 2 bits on any ISA measured).
fn layout(mine: &[&Record], key: &WorkloadKey, phase: Phase, isa: Isa) -> Option<Tiles> {
    let fastest = |fits: &dyn Fn(&TernaryTiles) -> bool| {
        mine.iter()
            .filter(|r| &r.key == key && r.phase == phase)
            .filter(|r| match r.tiles {
                Tiles::Ternary(t) => fits(&t),
                _ => true,
            })
            .filter_map(|r| Some((r.ns?, r.tiles)))
            .min_by_key(|&(ns, _)| ns)
    };
    let (ns, tiles) = fastest(&|_| true)?;
    let default = fastest(&|t| t.packing == Packing::Bits2 && t.isa == isa).or_else(|| fastest(&|t| t.packing == Packing::Bits2));
    match default {
        Some((default_ns, default)) if ns * 100 > default_ns * (100 - LAYOUT_MARGIN) => Some(default),
        _ => Some(tiles),
    }
}

/// The fastest measured CUDA tiles of each workload and phase, for one GPU.
pub struct CudaTuned {
    best: HashMap<(WorkloadKey, Phase), (CudaTiles, u64)>,
}

impl CudaTuned {
    pub fn new(records: &[Record], fingerprint: &str) -> CudaTuned {
        let mut best: HashMap<(WorkloadKey, Phase), (CudaTiles, u64)> = HashMap::new();
        for r in records.iter().filter(|r| r.fingerprint == fingerprint && r.space == SPACE_VERSION && r.is_ok()) {
            let (Tiles::Cuda(t), Some(ns)) = (r.tiles, r.ns) else { continue };
            if !t.fits(&r.key) {
                continue;
            }
            let slot = best.entry((r.key.clone(), r.phase)).or_insert((t, ns));
            if ns < slot.1 {
                *slot = (t, ns);
            }
        }
        CudaTuned { best }
    }

    /// Tiles for both phases; the heuristic's for a GPU of compute
    /// capability `sm` where a phase was not measured.
    pub fn tiles(&self, key: &WorkloadKey, sm: u32) -> PhaseTiles {
        let get = |phase| self.best.get(&(key.clone(), phase)).map(|b| b.0);
        let h = PhaseTiles::heuristic(key, sm);
        PhaseTiles { prefill: get(Phase::Prefill).unwrap_or(h.prefill), decode: get(Phase::Decode).unwrap_or(h.decode) }
    }

    pub fn contains(&self, key: &WorkloadKey) -> bool {
        self.best.keys().any(|(k, _)| k == key)
    }
}

impl TileSource for Tuned {
    fn tiles(&self, key: &WorkloadKey) -> Option<Tiles> {
        self.best.get(key).copied()
    }

    fn ternary_default(&self) -> Option<TernaryTiles> {
        match self.best.get(&crate::calibrate::key()) {
            Some(Tiles::Ternary(t)) => Some(*t),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitnet_codegen::cpu::ternary::Packing;
    use bitnet_codegen::cpu::Isa;

    /// A scratch folder, removed when the guard drops, and the database
    /// path inside it.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(name: &str) -> (Scratch, PathBuf) {
        let d = std::env::temp_dir().join(format!("bitnet-db-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let file = d.join("tuning.jsonl");
        (Scratch(d), file)
    }

    /// `r` with the 1.6-bit packing.
    fn base3(r: Record) -> Record {
        match r.tiles {
            Tiles::Ternary(t) => Record { tiles: Tiles::Ternary(TernaryTiles { packing: Packing::Base3, ..t }), ..r },
            _ => r,
        }
    }

    fn rec(key: &str, phase: Phase, rows: usize, tokens: usize, ns: u64) -> Record {
        Record {
            key: WorkloadKey(key.into()),
            phase,
            fingerprint: "cpu-test".into(),
            threads: 2,
            space: SPACE_VERSION,
            tiles: Tiles::Ternary(TernaryTiles { isa: Isa::Scalar, rows, tokens, split: Default::default(), packing: Default::default() }),
            ns: Some(ns),
            status: "ok".into(),
            at: 1,
        }
    }

    #[test]
    fn concurrent_writers_lose_nothing() {
        let (_scratch, path) = tmp("concurrent");
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        Database::at(&path).merge(&[rec(&format!("k{t}-{i}"), Phase::Decode, 1, 1, 5)]).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let loaded = Database::at(&path).load();
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        assert_eq!(loaded.records.len(), 80);
    }

    #[test]
    fn newer_measurements_replace_older_ones() {
        let (_scratch, path) = tmp("replace");
        let db = Database::at(path);
        db.merge(&[rec("k", Phase::Decode, 1, 4, 10), rec("k", Phase::Decode, 2, 4, 20)]).unwrap();
        db.merge(&[rec("k", Phase::Decode, 1, 4, 30)]).unwrap();
        let r = db.load().records;
        assert_eq!(r.len(), 2);
        assert_eq!(r.iter().find(|r| r.tiles == rec("k", Phase::Decode, 1, 4, 0).tiles).unwrap().ns, Some(30));
    }

    #[test]
    fn garbage_and_truncation_are_reported_not_fatal() {
        let (_scratch, path) = tmp("garbage");
        let db = Database::at(&path);
        db.merge(&[rec("a", Phase::Decode, 1, 4, 10), rec("b", Phase::Decode, 2, 4, 20)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        // Cut in the middle of the last record, and add garbage.
        std::fs::write(&path, format!("{}\n{{not json\n\u{0}\u{1}", &text[..text.len() - 20])).unwrap();
        let loaded = db.load();
        assert_eq!(loaded.records.len(), 1);
        assert!(loaded.problems[0].contains("3 unreadable records"), "{:?}", loaded.problems);
        // Writing again keeps the good record and drops the bad lines.
        db.merge(&[rec("c", Phase::Decode, 1, 4, 5)]).unwrap();
        assert_eq!(db.load().records.len(), 2);
        assert!(db.load().problems.is_empty());
    }

    #[test]
    fn a_foreign_file_is_ignored_and_moved_aside() {
        let (_scratch, path) = tmp("foreign");
        std::fs::write(&path, "{\"format\":\"bitnet-tuning\",\"version\":99}\n").unwrap();
        let db = Database::at(&path);
        let loaded = db.load();
        assert!(loaded.records.is_empty() && loaded.problems[0].contains("version 99"), "{:?}", loaded.problems);
        std::fs::write(&path, "hello").unwrap();
        assert!(db.load().problems[0].contains("not a bitnet tuning database"));
        db.merge(&[rec("k", Phase::Decode, 1, 4, 10)]).unwrap();
        assert_eq!(db.load().records.len(), 1);
        let aside =
            std::fs::read_dir(path.parent().unwrap()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".bad-")).count();
        assert_eq!(aside, 1, "the foreign file is kept beside the database");
        assert!(db.import(&path.with_extension("nope")).is_err());
    }

    #[test]
    fn the_source_takes_layout_from_decode_and_tokens_from_prefill() {
        let records = vec![
            rec("k", Phase::Decode, 4, 4, 100),
            rec("k", Phase::Decode, 2, 4, 90),
            rec("k", Phase::Prefill, 4, 2, 500),
            rec("k", Phase::Prefill, 2, 1, 800),
            rec("k", Phase::Prefill, 2, 2, 700),
            Record { threads: 1, ns: Some(1), ..rec("k", Phase::Decode, 1, 1, 1) },
            Record { fingerprint: "cpu-other".into(), ..rec("k", Phase::Decode, 1, 1, 1) },
            Record { status: "wrong: row 0".into(), ..rec("k", Phase::Decode, 1, 4, 1) },
        ];
        let t = Tuned::new(records, "cpu-test", 2);
        assert_eq!(
            t.tiles(&WorkloadKey("k".into())),
            Some(Tiles::Ternary(TernaryTiles { isa: Isa::Scalar, rows: 2, tokens: 2, split: Default::default(), packing: Default::default() }))
        );
        assert_eq!(t.tiles(&WorkloadKey("other".into())), None);
    }

    /// The calibration's fastest decode gives the ISA and packing of the
    /// products without tiles of their own, per machine and thread count;
    /// a packing is part of a layout, so prefill keeps the decode's.
    #[test]
    fn the_calibration_and_packing_are_read_back() {
        let key = crate::calibrate::key();
        let records = vec![
            rec(&key.0, Phase::Decode, 4, 1, 200),
            base3(rec(&key.0, Phase::Decode, 4, 1, 150)),
            rec("k", Phase::Decode, 4, 4, 100),
            base3(rec("k", Phase::Decode, 4, 4, 120)),
            base3(rec("k", Phase::Prefill, 4, 2, 400)),
            rec("k", Phase::Prefill, 4, 4, 500),
            rec(&key.0, Phase::Batch, 4, 4, 900),
            base3(rec(&key.0, Phase::Batch, 4, 4, 950)),
        ];
        let t = Tuned::new(records.clone(), "cpu-test", 2);
        assert!(t.is_calibrated());
        assert_eq!(t.ternary_default().map(|c| c.packing), Some(Packing::Base3));
        let Some(Tiles::Ternary(k)) = t.tiles(&WorkloadKey("k".into())) else { panic!("k is tuned") };
        assert_eq!((k.packing, k.tokens), (Packing::Bits2, 4), "the layout from decode, tokens from its prefill");
        let other = Tuned::new(records, "cpu-test", 3);
        assert!(!other.is_calibrated() && other.ternary_default().is_none());
    }

    /// An engine of many sequences takes the packing that ran the batched
    /// step fastest; a calibration from before batches were measured is
    /// redone where the CPU has two packings to choose from.
    #[test]
    fn batches_take_their_own_packing() {
        let key = crate::calibrate::key();
        let mut records = vec![rec(&key.0, Phase::Decode, 4, 1, 200), base3(rec(&key.0, Phase::Decode, 4, 1, 150))];
        let decode_only = Tuned::new(records.clone(), "cpu-test", 2);
        assert_eq!(decode_only.is_calibrated(), crate::calibrate::batch_candidates().is_empty());
        assert_eq!(decode_only.batch_default(), None);
        assert_eq!(decode_only.for_batches().ternary_default().map(|c| c.packing), Some(Packing::Base3), "nothing measured: decode's choice");
        records.extend([rec(&key.0, Phase::Batch, 4, 4, 300), base3(rec(&key.0, Phase::Batch, 4, 4, 400))]);
        let t = Tuned::new(records.clone(), "cpu-test", 2);
        assert!(t.is_calibrated());
        assert_eq!(t.ternary_default().map(|c| c.packing), Some(Packing::Base3), "one sequence: the decode's packing");
        assert_eq!(t.batch_default().map(|c| c.packing), Some(Packing::Bits2));
        assert_eq!(t.for_batches().ternary_default().map(|c| c.packing), Some(Packing::Bits2), "many: the batch's");
        // The margin holds for batches too.
        records.extend([base3(rec(&key.0, Phase::Batch, 4, 4, 250))]);
        assert_eq!(Tuned::new(records.clone(), "cpu-test", 2).batch_default().map(|c| c.packing), Some(Packing::Base3), "1.6 bits 17% faster");
        records.extend([rec(&key.0, Phase::Batch, 4, 4, 280)]);
        assert_eq!(Tuned::new(records, "cpu-test", 2).batch_default().map(|c| c.packing), Some(Packing::Bits2), "11% is not enough");
    }

    /// 1.6 bits win decode only by [`LAYOUT_MARGIN`] or more: a closer win
    /// keeps the 2-bit layout, whose prefill and batched steps are faster.
    #[test]
    fn one_point_six_bits_must_win_by_the_margin() {
        let key = crate::calibrate::key();
        let packing = |two_bit: u64, one_six: u64| {
            let records = vec![rec(&key.0, Phase::Decode, 4, 1, two_bit), base3(rec(&key.0, Phase::Decode, 2, 1, one_six))];
            let t = Tuned::new(records, "cpu-test", 2).ternary_default().expect("calibrated");
            (t.packing, t.rows)
        };
        assert_eq!(packing(100, 90), (Packing::Bits2, 4), "10% faster is not enough");
        assert_eq!(packing(100, 86), (Packing::Bits2, 4));
        assert_eq!(packing(100, 85), (Packing::Base3, 2), "15% faster is");
        assert_eq!(packing(100, 70), (Packing::Base3, 2));
        assert_eq!(packing(100, 120), (Packing::Bits2, 4));
    }

    #[test]
    fn export_then_import_round_trips() {
        let (_a, path_a) = tmp("export-a");
        let a = Database::at(path_a);
        a.merge(&[rec("k", Phase::Decode, 1, 4, 10)]).unwrap();
        let (_f, file) = tmp("export-file");
        assert_eq!(a.export(&file).unwrap(), 1);
        let (_b, path_b) = tmp("export-b");
        let b = Database::at(path_b);
        assert_eq!(b.import(&file).unwrap().0, 1);
        assert_eq!(a.load().records, b.load().records);
        assert_eq!(b.clear().unwrap(), 1);
        assert!(b.load().records.is_empty());
    }

    #[test]
    fn cuda_tiles_are_the_fastest_right_ones_of_that_gpu_per_phase() {
        let cuda = |phase, warps, tokens, ns: u64, fingerprint: &str, status: &str| Record {
            fingerprint: fingerprint.into(),
            tiles: Tiles::Cuda(CudaTiles { warps, tokens, mma: false }),
            status: status.into(),
            threads: 1,
            ..rec("ternary_matmul n=1 k=1", phase, 1, 1, ns)
        };
        let records = vec![
            cuda(Phase::Decode, 4, 4, 50, "cuda A", "ok"),
            cuda(Phase::Decode, 2, 1, 30, "cuda A", "ok"),
            cuda(Phase::Decode, 1, 1, 10, "cuda A", "wrong: differs"),
            cuda(Phase::Decode, 8, 1, 5, "cuda B", "ok"),
            cuda(Phase::Prefill, 4, 8, 90, "cuda A", "ok"),
            cuda(Phase::Prefill, 4, 4, 99, "cuda A", "ok"),
            // A CPU record of the same key is not a CUDA measurement.
            rec("ternary_matmul n=1 k=1", Phase::Prefill, 1, 1, 1),
        ];
        let t = CudaTuned::new(&records, "cuda A");
        let key = WorkloadKey("ternary_matmul n=1 k=1".into());
        let dp4a = |warps, tokens| CudaTiles { warps, tokens, mma: false };
        assert_eq!(t.tiles(&key, 90), PhaseTiles { prefill: dp4a(4, 8), decode: dp4a(2, 1) });
        // Decode only: prefill takes the heuristic's (tensor cores from sm_80).
        let t = CudaTuned::new(&records[..2], "cuda A");
        assert_eq!(t.tiles(&key, 90), PhaseTiles { prefill: CudaTiles::MMA_DEFAULT, decode: dp4a(2, 1) });
        assert_eq!(t.tiles(&key, 75).prefill, CudaTiles::DEFAULT);
        assert!(!CudaTuned::new(&records, "cuda C").contains(&key));
        // Tensor-core tiles for a float product (a damaged database) are ignored.
        let head = Record { key: WorkloadKey("matmul n=1 k=1 w=f16".into()), tiles: Tiles::Cuda(CudaTiles::MMA_DEFAULT), ..records[0].clone() };
        assert!(!CudaTuned::new(&[head], "cuda A").contains(&WorkloadKey("matmul n=1 k=1 w=f16".into())));
        assert_eq!(CudaTuned::new(&records, "cuda C").tiles(&key, 90), PhaseTiles::heuristic(&key, 90));
    }
}
