"""Label Studio: the labeling config, the box conversions both ways and the active-learning order (`convert`,
`config`); server control, client, sync/pull/push build on these."""
