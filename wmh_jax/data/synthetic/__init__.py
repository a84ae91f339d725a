"""The synthetic cohort's generator: anatomy, sites, subjects and the rendering of one scan."""
