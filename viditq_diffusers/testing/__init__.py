"""Models for tests and benchmarks: `zoo` builds tiny random-weight versions of the supported diffusers DiTs,
`stress` makes a function-preserving copy of a pipeline with large activation outliers. Nothing else in the
package imports them."""
