//! One file per method family, named after its methods (see `method::Family`): each file's doc opens with the
//! math it implements, and its `merge` is the family's kernel.

pub(super) mod arcee_fusion;
pub(super) mod model_stock;
pub(super) mod nearswap;
pub(super) mod ram;
pub(super) mod sce;
pub(super) mod slerp;
pub(super) mod spectral;
pub(super) mod tall;
pub(super) mod task_arithmetic;
