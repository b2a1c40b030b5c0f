//! A snapshot of environment variables, so detection is a pure function that tests drive with a map.

use std::collections::BTreeMap;

/// Environment variables as detection sees them: a sorted map from name to value.
///
/// [`Env::from_process`] takes the real environment; tests build one with [`Env::from_pairs`]. Detection treats a
/// variable whose value is empty as unset, as Kubernetes manifests often leave `value: ""` to mean "not given".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// The environment of this process. Names or values that are not UTF-8 are converted lossily.
    pub fn from_process() -> Env {
        Env {
            vars: std::env::vars_os()
                .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
                .collect(),
        }
    }

    /// An environment holding exactly these variables (a later pair wins over an earlier one of the same name).
    pub fn from_pairs<I, K, V>(pairs: I) -> Env
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut env = Env::default();
        env.extend(pairs);
        env
    }

    /// The raw value of `name`, including an empty one.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Sets `name` to `value`, replacing any earlier value.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.vars.insert(name.into(), value.into());
    }

    /// Removes `name`.
    pub fn remove(&mut self, name: &str) {
        self.vars.remove(name);
    }

    /// All variables in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The value of `name` when it is set and not empty.
    pub(crate) fn value(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    /// Whether `name` is set to something non-empty.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.value(name).is_some()
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for Env {
    fn extend<T: IntoIterator<Item = (K, V)>>(&mut self, iter: T) {
        for (k, v) in iter {
            self.vars.insert(k.into(), v.into());
        }
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Env {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        Env::from_pairs(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_values_count_as_unset_but_stay_readable() {
        let env = Env::from_pairs([("RANK", ""), ("WORLD_SIZE", "2")]);
        assert_eq!(env.get("RANK"), Some(""));
        assert_eq!(env.value("RANK"), None);
        assert!(env.has("WORLD_SIZE"));
    }

    #[test]
    fn later_pairs_replace_earlier_ones() {
        let mut env = Env::from_pairs([("RANK", "0")]);
        env.extend([("RANK", "3")]);
        assert_eq!(env.get("RANK"), Some("3"));
        env.remove("RANK");
        assert_eq!(env.get("RANK"), None);
    }

    #[test]
    fn from_process_sees_the_real_environment() {
        let env = Env::from_process();
        assert_eq!(env.get("PATH").map(str::to_owned), std::env::var("PATH").ok());
    }
}
