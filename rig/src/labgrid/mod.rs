//! labgrid as the lab's reservation engine (issue 17 item 4).
pub mod proto {
    //! Generated from `rig/proto/labgrid-coordinator.proto`.
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("labgrid");
}
