"""Radiomics signatures: LASSO-Cox and logistic endpoints, nomograms, fitted and scored."""
