"""Local training: one client's optimiser steps (`local`) and their private version (`privacy`);
generation-based evaluation of causal LMs (`generation`)."""
