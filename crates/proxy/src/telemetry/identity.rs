//! Certificate metrics read from the identity store at scrape time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::sync::Arc;
use trellis_identity::IdentityStore;

/// `trellis_identity_cert_expiry_timestamp_seconds` and `trellis_identity_cert_rotations_total`.
#[derive(Debug)]
pub struct IdentityCollector(pub Arc<IdentityStore>);

impl Collector for IdentityCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(info) = self.0.info() {
            let g = ConstGauge::new(info.not_after as f64);
            let m = enc.encode_descriptor(
                "trellis_identity_cert_expiry_timestamp_seconds",
                "Expiry of the workload certificate in use, seconds since the Unix epoch",
                None,
                g.metric_type(),
            )?;
            g.encode(m)?;
        }
        let c = ConstCounter::new(self.0.rotations());
        let m = enc.encode_descriptor(
            "trellis_identity_cert_rotations",
            "Workload certificates installed after the first",
            None,
            c.metric_type(),
        )?;
        c.encode(m)
    }
}
