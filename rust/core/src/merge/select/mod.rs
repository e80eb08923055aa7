//! Which elements of a delta a method keeps: exact streaming top-k over whole tensors (`topk`) and the
//! sparsifiers of the task-arithmetic family (`sparsify`: breadcrumbs' outlier band, DELLA's rank-dependent
//! keep probabilities).

pub(crate) mod sparsify;
pub(crate) mod topk;
