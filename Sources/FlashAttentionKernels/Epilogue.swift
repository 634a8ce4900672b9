import FlashAttentionCore

/// The epilogue of a forward work item: each row's output normalised and stored in the output's type, with
/// its LSE — or, for one split of a split item, its normalised partial state for `ForwardPlan.mergeSplits`.

/// Writes the item's rows: final outputs and LSEs (with the sink folded in), or, for a split item, its
/// normalised partial state.
func finishItem(_ plan: ForwardPlan, _ item: WorkItem, _ w: Workspace) {
    let p = plan.problem
    let d = p.headDimV
    let ldO = Workspace.paddedDim(d)
    for r in 0..<item.rows {
        guard let (head, position) = item.query(row: r) else { continue }
        let row = item.sequence.qRow + position
        // ALiBi was rebased on the row's nearest visible key; its bias returns to the LSE here.
        let bias = w.rowSlope[r] * w.rowDistance[r]
        let o = w.o + r * ldO
        if plan.partials != nil {
            let slot = plan.partialRow(item, row: r)
            let (factor, lse) = finishRow(rowMax: w.rowMax[r], rowSum: w.rowSum[r], lseShift: -bias, sink: -.infinity)
            storeRow(Float32Storage.self, o, count: d, scale: factor, into: slot)
            slot[d] = lse
        } else {
            let (factor, lse) = finishRow(
                rowMax: w.rowMax[r], rowSum: w.rowSum[r], lseShift: -bias, sink: p.sinks.map { $0[head] } ?? -.infinity)
            withStorage(p.out.element) { storage in
                storeRow(storage, o, count: d, scale: factor, into: p.out.row(batch: item.sequence.qBatch, head: head, row: row))
            }
            p.lse?.row(batch: item.sequence.qBatch, head: head, row: row).pointee = lse
        }
    }
}
