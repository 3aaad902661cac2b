//! (placeholder: filled by the partitions work)
