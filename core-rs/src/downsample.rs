//! Shape-preserving downsamplers for series queries (LTTB, min/max, M4, bucket average).
//! Owned by the analyst-path work; see issue "Analyst path".
