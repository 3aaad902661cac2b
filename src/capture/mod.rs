//! (placeholder: filled by the capture work)
