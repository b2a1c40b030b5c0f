//! A dataset folder: an EFS or FSx mount, a SageMaker File or FastFile channel, or any local folder.

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{check_name, show, Object, Source};
use crate::Error;

/// A folder read recursively, or a single file.
///
/// Objects are the regular files below the root, named by their `/`-separated path relative to it, so a folder and
/// the S3 prefix it was copied from list the same names. Symbolic links are followed; a link back to a folder that
/// is already being walked (a loop) is skipped with a warning rather than walked forever. FIFOs, sockets and devices
/// are skipped: reading one could block forever.
#[derive(Debug, Clone)]
pub struct Dir {
    root: PathBuf,
    /// The root is a file: the source holds that one object.
    single_file: bool,
    sharded_by_host: bool,
}

impl Dir {
    /// A source over `root`, which must be an existing folder or file.
    pub fn new(root: impl AsRef<Path>) -> Result<Self, Error> {
        let root = root.as_ref().to_path_buf();
        let meta = fs::metadata(&root).map_err(|io| Error::Path {
            reason: match io.kind() {
                std::io::ErrorKind::NotFound => {
                    "no such file or folder; check --data (and that the file system or channel is mounted)".to_owned()
                }
                _ => format!("cannot open: {io}"),
            },
            path: root.clone(),
        })?;
        Ok(Self { single_file: !meta.is_dir(), root, sharded_by_host: false })
    }

    /// Marks this folder as holding only this host's part of the dataset (a `ShardedByS3Key` channel).
    pub fn with_sharded_by_host(mut self, sharded: bool) -> Self {
        self.sharded_by_host = sharded;
        self
    }

    /// The folder (or file) this source reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, name: &str) -> Result<PathBuf, Error> {
        if self.single_file {
            if Some(name) == self.root.file_name().and_then(|n| n.to_str()) {
                return Ok(self.root.clone());
            }
            return Err(self.read_error(name, std::io::ErrorKind::NotFound.into()));
        }
        check_name(&self.describe(), name)?;
        Ok(self.root.join(name))
    }

    fn read_error(&self, name: &str, io: std::io::Error) -> Error {
        Error::Read { source_desc: self.describe(), name: name.to_owned(), io }
    }

    /// Walks `dir` (whose name relative to the root is `prefix`), following links, guarding against loops with the
    /// (device, inode) pairs of the folders on the current path.
    fn walk(
        &self,
        dir: &Path,
        prefix: &str,
        ancestors: &mut HashSet<(u64, u64)>,
        out: &mut Vec<Object>,
    ) -> Result<(), Error> {
        let cannot_list =
            |io: std::io::Error| Error::Path { path: dir.to_path_buf(), reason: format!("cannot list: {io}") };
        for entry in fs::read_dir(dir).map_err(cannot_list)? {
            let entry = entry.map_err(cannot_list)?;
            let path = entry.path();
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                return Err(Error::Path {
                    path,
                    reason: "file name is not UTF-8; rename it (object names must match S3 keys)".to_owned(),
                });
            };
            // fs::metadata follows symbolic links, so a link is listed as what it points to.
            let meta = fs::metadata(&path).map_err(|io| Error::Path {
                reason: if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                    format!("broken symbolic link: {io}")
                } else {
                    format!("cannot stat: {io}")
                },
                path: path.clone(),
            })?;
            let name = if prefix.is_empty() { file_name.to_owned() } else { format!("{prefix}/{file_name}") };
            if meta.is_dir() {
                let id = (meta.dev(), meta.ino());
                if !ancestors.insert(id) {
                    tracing::warn!(path = %path.display(), "skipping a symbolic link loop back to a parent folder");
                    continue;
                }
                self.walk(&path, &name, ancestors, out)?;
                ancestors.remove(&id);
            } else if meta.is_file() {
                out.push(Object { name, size: meta.len() });
            } else {
                tracing::warn!(path = %path.display(), "skipping a FIFO, socket or device file in a dataset folder");
            }
        }
        Ok(())
    }
}

impl Source for Dir {
    fn describe(&self) -> String {
        show(&self.root)
    }

    fn list(&self) -> Result<Vec<Object>, Error> {
        let mut objects = Vec::new();
        if self.single_file {
            let name = self.root.file_name().and_then(|n| n.to_str()).ok_or_else(|| Error::Path {
                path: self.root.clone(),
                reason: "file name is not UTF-8; rename it".to_owned(),
            })?;
            let meta = fs::metadata(&self.root)
                .map_err(|io| Error::Path { path: self.root.clone(), reason: format!("cannot stat: {io}") })?;
            objects.push(Object { name: name.to_owned(), size: meta.len() });
        } else {
            let root_meta = fs::metadata(&self.root)
                .map_err(|io| Error::Path { path: self.root.clone(), reason: format!("cannot stat: {io}") })?;
            let mut ancestors = HashSet::from([(root_meta.dev(), root_meta.ino())]);
            self.walk(&self.root, "", &mut ancestors, &mut objects)?;
        }
        if objects.is_empty() {
            return Err(Error::Empty(self.describe()));
        }
        objects.sort();
        Ok(objects)
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, Error> {
        let path = self.path_of(name)?;
        super::read_file(&self.describe(), name, &path)
    }

    fn read_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        let path = self.path_of(name)?;
        let mut file = fs::File::open(&path).map_err(|io| self.read_error(name, io))?;
        file.seek(SeekFrom::Start(offset)).map_err(|io| self.read_error(name, io))?;
        let mut out = Vec::new();
        file.take(len).read_to_end(&mut out).map_err(|io| self.read_error(name, io))?;
        Ok(out)
    }

    fn already_sharded_by_host(&self) -> bool {
        self.sharded_by_host
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn names(objects: &[Object]) -> Vec<&str> {
        objects.iter().map(|o| o.name.as_str()).collect()
    }

    #[test]
    fn lists_nested_files_sorted_by_slash_separated_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("train/b")).unwrap();
        fs::write(dir.path().join("train/b/2.tar"), b"22").unwrap();
        fs::write(dir.path().join("train/a.tar"), b"1").unwrap();
        fs::write(dir.path().join("train-x.tar"), b"333").unwrap();
        let source = Dir::new(dir.path()).unwrap();
        let objects = source.list().unwrap();
        // Bytewise order of the names, as S3 lists keys: '-' (0x2d) sorts before '/' (0x2f).
        assert_eq!(names(&objects), ["train-x.tar", "train/a.tar", "train/b/2.tar"]);
        assert_eq!(objects.iter().map(|o| o.size).collect::<Vec<_>>(), [3, 1, 2]);
        assert_eq!(source.read("train/b/2.tar").unwrap(), b"22");
        assert_eq!(source.read_range("train-x.tar", 1, 10).unwrap(), b"33");
    }

    #[test]
    fn symlink_loop_is_skipped_and_linked_files_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/x.tar"), b"x").unwrap();
        symlink(dir.path(), dir.path().join("d/loop")).unwrap();
        symlink(dir.path().join("d/x.tar"), dir.path().join("y.tar")).unwrap();
        let objects = Dir::new(dir.path()).unwrap().list().unwrap();
        assert_eq!(names(&objects), ["d/x.tar", "y.tar"]);
    }

    #[test]
    fn broken_symlink_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        symlink(dir.path().join("gone"), dir.path().join("dangling.tar")).unwrap();
        let err = Dir::new(dir.path()).unwrap().list().unwrap_err().to_string();
        assert!(err.contains("dangling.tar") && err.contains("broken symbolic link"), "{err}");
    }

    #[test]
    fn missing_folder_error_names_the_path() {
        let err = Dir::new("/nonexistent/hytrain-data").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/hytrain-data") && err.contains("no such file or folder"), "{err}");
    }

    #[test]
    fn empty_folder_is_an_empty_source() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        let err = Dir::new(dir.path()).unwrap().list().unwrap_err();
        assert!(matches!(err, Error::Empty(_)), "{err}");
        assert!(err.to_string().contains("the source is empty"));
    }

    #[test]
    fn a_single_file_is_a_source_of_one_object() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("only.tar");
        fs::write(&file, b"abc").unwrap();
        let source = Dir::new(&file).unwrap();
        assert_eq!(source.list().unwrap(), [Object { name: "only.tar".into(), size: 3 }]);
        assert_eq!(source.read("only.tar").unwrap(), b"abc");
        assert!(source.read("other.tar").is_err());
    }

    #[test]
    fn read_of_a_missing_object_names_source_and_object() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"").unwrap();
        let err = Dir::new(dir.path()).unwrap().read("b.tar").unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()) && err.contains("b.tar"), "{err}");
        let err = Dir::new(dir.path()).unwrap().read("../a").unwrap_err().to_string();
        assert!(err.contains("not an object name"), "{err}");
    }

    #[test]
    fn fifos_in_a_dataset_folder_are_skipped_not_read() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.tar"), b"a").unwrap();
        let fifo = std::ffi::CString::new(dir.path().join("training_0").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert_eq!(names(&Dir::new(dir.path()).unwrap().list().unwrap()), ["a.tar"]);
    }
}
