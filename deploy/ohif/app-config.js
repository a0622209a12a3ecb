/*
 * OHIF viewer config for the sarcnode compose stack (deploy/compose.yaml).
 * The viewer and Orthanc's DICOMweb are served from one origin by
 * deploy/nginx/default.conf (Orthanc sends no CORS headers), so every root
 * below is a path on the page's own origin.
 */
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  // Load SEG overlays without asking, and skip the investigational-use dialog.
  disableConfirmationPrompts: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (sarcnode demo PACS)',
        name: 'orthanc',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/wado',
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
  // No guided tour: it covers the viewport.
  customizationService: {
    'ohif.tours': { $set: [] },
  },
};
