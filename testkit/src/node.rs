//! TestNode / TestCluster (being written).
pub struct TestNode;
pub struct TestCluster;
