//! The input channels a platform hands a job, in SageMaker's own words. hytrain-data opens them
//! (`hytrain_data::source::open_channel`); this crate only finds them, so both use the types defined here.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One input channel of the job (on SageMaker: `SM_CHANNEL_<NAME>` or `<root>/input/data/<name>`, with
/// inputdataconfig.json's `TrainingInputMode`, `S3DistributionType`, `ContentType` and `RecordWrapperType`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Channel {
    /// The channel directory; in Pipe mode the base path whose `_<epoch>` siblings are the FIFOs.
    pub path: PathBuf,
    /// How SageMaker delivers the data.
    pub input_mode: InputMode,
    /// Whether every host sees all objects or a shard of them.
    pub s3_distribution: S3Distribution,
    /// The channel's `ContentType`, if given.
    pub content_type: Option<String>,
    /// The channel's `RecordWrapperType` (`None` or `RecordIO`), if given.
    pub record_wrapper_type: Option<String>,
}

/// SageMaker's `TrainingInputMode`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum InputMode {
    /// Objects are copied to the channel directory before training starts.
    File,
    /// Objects are streamed on demand through a read-only mount at the channel directory.
    FastFile,
    /// Objects are streamed through FIFOs `<channel>_<epoch>`, each read once, in order.
    Pipe,
}

impl InputMode {
    /// SageMaker's spelling: `File`, `FastFile` or `Pipe`.
    pub fn as_str(self) -> &'static str {
        match self {
            InputMode::File => "File",
            InputMode::FastFile => "FastFile",
            InputMode::Pipe => "Pipe",
        }
    }
}

impl fmt::Display for InputMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses SageMaker's spellings in any case, as SageMaker itself accepts them.
impl FromStr for InputMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [InputMode::File, InputMode::FastFile, InputMode::Pipe]
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("'{s}' is not a TrainingInputMode; expected File, FastFile or Pipe"))
    }
}

/// SageMaker's `S3DistributionType`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum S3Distribution {
    /// Every host gets every object.
    FullyReplicated,
    /// Each host gets a disjoint subset of the objects.
    ShardedByS3Key,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_mode_parses_sagemaker_spellings_in_any_case() {
        assert_eq!("File".parse::<InputMode>().unwrap(), InputMode::File);
        assert_eq!("fastfile".parse::<InputMode>().unwrap(), InputMode::FastFile);
        assert_eq!("PIPE".parse::<InputMode>().unwrap(), InputMode::Pipe);
        assert!("Stream".parse::<InputMode>().unwrap_err().contains("File, FastFile or Pipe"));
        for m in [InputMode::File, InputMode::FastFile, InputMode::Pipe] {
            assert_eq!(m.to_string().parse::<InputMode>().unwrap(), m);
            assert_eq!(serde_json::to_value(m).unwrap(), serde_json::json!(m.as_str()));
        }
    }
}
